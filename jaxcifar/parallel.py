"""Data parallelism: one ``Mesh`` with a ``data`` axis over the devices, and its shardings; and the
start, watch and end of a multi-process (multi-host) run.

The batch is sharded along ``data``; parameters, batch statistics and optimizer state are
replicated; the step is one ``jax.jit`` with these shardings (no ``pmap``). BatchNorm means and
variances are reductions over the batch axis, so XLA computes them over the global batch (with an
all-reduce): 1 device and N devices give the same result for the same global batch.

Several processes (``--distributed``): ``initialize_distributed`` calls ``jax.distributed.initialize``
within a bounded time, checks with one collective that every process runs the same configuration,
and connects the processes by a watchdog (process 0 is its hub: one TCP connection per other
process). A process that dies, by ``kill -9`` or after an error, closes its connection at once; the
others end within about a second with one line naming it, instead of waiting in a collective until
JAX's heartbeat timeout aborts them with a stack trace. ``finish_distributed`` ends a run that went
well on every process together.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcifar import console, interrupts
from jaxcifar.errors import ConfigError, DataError, JaxcifarError

log = logging.getLogger(__name__)

DATA_AXIS = "data"

# Seconds, overridable by the environment (there are no flags for them: they are properties of the cluster,
# not of the run). INIT: how long ``jax.distributed.initialize`` may wait for every process to join (JAX's
# default is 300 s too: hosts of a pod can start minutes apart). PEER: how long a process may send nothing
# (it pings every PEER / 6 s) before the others give it up, for failures that leave its connection open (a
# host that loses power or network); a killed or failed process is noticed at once, whatever this is.
INIT_TIMEOUT_ENV, INIT_TIMEOUT_DEFAULT = "JAXCIFAR_DISTRIBUTED_INIT_TIMEOUT", 300.0
PEER_TIMEOUT_ENV, PEER_TIMEOUT_DEFAULT = "JAXCIFAR_DISTRIBUTED_PEER_TIMEOUT", 60.0
# After a peer's connection closes, wait this long before ending: when every process fails alike (the same
# bad value), each one's own error line wins over a "lost process" line.
LOST_GRACE_SECONDS = 1.0
# Config fields that may differ between the processes of one run: where each host finds its copy of the data.
PROCESS_LOCAL_FIELDS = ("data_dir", "download")


class DistributedError(JaxcifarError):
    """The processes of a multi-process run could not start, or lost one another."""


def make_mesh(num_devices: int = 0) -> Mesh:
    """Returns a 1-D mesh over the first ``num_devices`` devices (0 = all, across all hosts)."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ConfigError(f"--num-devices {num_devices}: only {len(devices)} {devices[0].platform} device(s) present")
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        raise ConfigError(
            f"--num-devices {num_devices}: a run of {jax.process_count()} processes uses all {len(devices)} devices "
            "(every process must hold part of the mesh); use --num-devices 0"
        )
    chosen = devices[: num_devices or len(devices)]
    return Mesh(chosen, (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of ``mesh`` (state, datasets, indices)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the ``data`` axis of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, flag: str) -> None:
    """Raises ConfigError unless ``batch_size`` splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(
            f"{flag} {batch_size} is not divisible by the {n} devices; use a multiple of {n} "
            f"(e.g. {max(n, batch_size // n * n)}) or --num-devices"
        )


def describe(mesh: Mesh) -> str:
    """Returns e.g. ``devices: 8 x cpu``, or ``devices: 8 x cpu (2 processes x 4; this is process 1)``."""
    devices = mesh.devices.flatten()
    text = f"devices: {len(devices)} x {devices[0].platform}"
    if jax.process_count() > 1:
        text += (
            f" ({jax.process_count()} processes x {jax.local_device_count()}; this is process {jax.process_index()})"
        )
    return text


def is_main_process() -> bool:
    """True in process 0, the one that writes the run's files (and in a single-process run). Does not start
    the JAX backend when ``jax.distributed`` is not initialized (so it can be asked before that)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


# --- start-up -----------------------------------------------------------------------------------------------


def initialize_distributed(config: Any = None) -> None:
    """Starts a multi-process run, once per process: ``jax.distributed.initialize()`` (arguments
    auto-detected on Cloud TPU, Slurm and Open MPI, or from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), then the peer watchdog. With ``config`` (a ``Config``),
    also checks that every process runs the same configuration (ConfigError naming the fields that differ).

    Every failure ends in one line: a busy coordinator port, a coordinator that does not answer or
    processes that do not all join within ``JAXCIFAR_DISTRIBUTED_INIT_TIMEOUT`` seconds (the process
    then ends at once, exit code 1: ``jax.distributed.initialize`` cannot be interrupted)."""
    if _watch.started is None:
        if not jax.distributed.is_initialized():
            _initialize()
        _watch.started = time.time()
        if jax.process_count() > 1:
            _guard_stderr()
        with _quiet_stdout():  # gloo prints "[Gloo] Rank 0 is connected to 1 peer ranks..." as it connects
            port = _watch.listen() if jax.process_index() == 0 and jax.process_count() > 1 else 0
            ports = _allgather(np.array([port], np.int32))
            mesh = make_mesh()  # and the connections the train step's all-reduce uses, while stdout is quiet:
            ones = jax.device_put(np.ones(mesh.devices.size, np.float32), batch_sharded(mesh))
            jax.block_until_ready(jax.jit(jax.numpy.sum, out_shardings=replicated(mesh))(ones))
            jax.block_until_ready(jax.device_put(np.zeros(1), replicated(mesh)))
        if jax.process_count() > 1:
            _watch.connect(int(ports[0, 0]))
            atexit.register(_finish_at_exit)  # a script that ends normally (the command line calls it itself)
            sys.excepthook = _excepthook(sys.excepthook)
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    if config is not None:
        check_same_config(config)


def _initialize() -> None:
    kwargs: dict[str, Any] = {}
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        try:
            kwargs = {
                "coordinator_address": address,
                "num_processes": int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                "process_id": int(os.environ.get("JAX_PROCESS_ID", "0")),
            }
        except ValueError as e:
            raise ConfigError(f"--distributed: JAX_NUM_PROCESSES/JAX_PROCESS_ID must be integers ({e})") from None
        if kwargs["process_id"] == 0:
            _check_port_free(address)
    init_timeout = _seconds(INIT_TIMEOUT_ENV, INIT_TIMEOUT_DEFAULT)
    peer_timeout = _seconds(PEER_TIMEOUT_ENV, PEER_TIMEOUT_DEFAULT)
    where = f"the coordinator {address}" if address else "the coordinator"
    # JAX's own limits are set beyond ours: past them it aborts the process with a stack trace
    # (SIGABRT, "Terminating process because the JAX distributed service detected fatal errors").
    timer = threading.Timer(init_timeout, _end, args=(_init_timeout_message(where, kwargs, init_timeout), 1))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            **kwargs,
            initialization_timeout=int(init_timeout) + 60,
            heartbeat_timeout_seconds=int(peer_timeout) + 60,
        )
    except Exception as e:  # JaxRuntimeError, RuntimeError, ValueError from the cluster detection
        text = " ".join(str(e).split())
        if "Failed to start RPC server" in text:
            text = f"cannot start {where}: its port is in use or cannot be bound ({text})"
        raise DistributedError(f"--distributed: jax.distributed.initialize failed: {text}") from None
    finally:
        timer.cancel()


def _init_timeout_message(where: str, kwargs: dict[str, Any], seconds: float) -> str:
    count = f"all {kwargs['num_processes']} processes (JAX_NUM_PROCESSES)" if kwargs else "all processes"
    return (
        f"--distributed: {where} did not answer, or not {count} joined, within {seconds:g} s "
        f"({INIT_TIMEOUT_ENV}); start every process with the same coordinator address and process count, "
        "each with its own JAX_PROCESS_ID, and process 0 first or within that time"
    )


def _check_port_free(address: str) -> None:
    """Raises DistributedError when the coordinator's port is taken (before gRPC logs its own lines about it)."""
    port = address.rsplit(":", 1)[-1]
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--distributed: JAX_COORDINATOR_ADDRESS {address!r} needs a port: HOST:PORT") from None
    # gRPC binds [::]:PORT (all addresses); a dual-stack IPv6 bind collides with any IPv4 listener on PORT too.
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a port in TIME_WAIT is free
            try:
                probe.bind((host, number))
                return
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    continue  # e.g. no IPv6 on this host: try IPv4
                raise DistributedError(
                    f"--distributed: cannot start the coordinator on port {number} (JAX_COORDINATOR_ADDRESS "
                    f"{address}): {e.strerror}; another program (or another run) holds it: choose another port"
                ) from None


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name}={text!r}: a positive number of seconds")
    return value


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Sends file descriptor 1 to /dev/null meanwhile: gloo (the CPU collectives) prints one line per peer
    connection there from C++, with no switch to turn it off; errors still reach stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# The stderr guard: a small process that forwards this process's stderr, except the last words of a process
# that a peer's death brings down before the watchdog can speak. When process 0 dies, its coordination service
# dies with it, and JAX's client in every other process logs "E... coordination_service_agent.cc:...] Polled
# an error from coordination service" (and "W... preemption_sync_manager.cc:...] Failed to retrieve preemption
# notice ..."; such lines are held for 0.5 s), then "F... client.h:...] Terminating process because the JAX
# distributed service detected fatal errors" with a stack trace, and aborts; or gloo, inside a collective,
# gets half a message and aborts ("terminate called after throwing an instance of 'gloo::EnforceNotMet'").
# Both happen within microseconds of the moment the watchdog hears of the death: which line comes first is a
# coin toss, and the abort may win. The guard drops those lines, keeps the watchdog's, and says the line
# itself when the process died before the watchdog could (exit code 134, SIGABRT, in that case).
_GUARD = r"""
import os, re, select, signal, sys, time
for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
prog, processes = sys.argv[1].encode(), sys.argv[2]
polled = re.compile(rb"^[EW]\d{4} [\d:.]+ +\d+ (coordination_service_agent|preemption_sync_manager)\.cc:\d+\] ")
jax_fatal = re.compile(rb"^F\d{4} [\d:.]+ +\d+ \S+:\d+\] Terminating process because the JAX distributed service")
gloo_fatal = re.compile(rb"^terminate called after throwing an instance of 'gloo::")
ours = prog + b": "
held, since, dying, said, status, pending = [], 0.0, b"", False, b"", b""
def put(data):
    try:
        os.write(1, data)
    except OSError:
        pass
while True:
    wait = max(0.0, 0.5 - (time.monotonic() - since)) if held else None
    if not select.select([0], [], [], wait)[0]:
        put(b"".join(held)); held = []
        continue
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *lines, pending = (pending + chunk).split(b"\n")
    for line in (l + b"\n" for l in lines):
        if line.startswith(ours):
            held, said = [], True
            put(line)
        elif dying:
            if not status and dying == b"jax" and b"absl::Status:" in line:
                status = line.split(b"absl::Status:", 1)[1].strip()
            if not status and dying == b"gloo" and b"what():" in line:
                status = line.split(b"] ", 1)[-1].strip()
        elif jax_fatal.match(line) or gloo_fatal.match(line):
            held, dying = [], b"jax" if jax_fatal.match(line) else b"gloo"
            status = line.split(b"absl::Status:", 1)[1].strip() if b"absl::Status:" in line else b""
        elif held or polled.match(line):
            since = since if held else time.monotonic()
            held.append(line)
        else:
            put(line)
if pending and not dying:
    held.append(pending)
if not dying:
    put(b"".join(held))
elif not said:
    reason = status[:300]
    if dying == b"jax":
        what = (b"lost process 0 of " + processes.encode() + b" (it runs JAX's coordination service; JAX ended this "
                b"process: " + (reason or b"its coordination service failed") + b")")
    else:
        what = (b"a collective across the " + processes.encode() + b" processes failed: another process died or is "
                b"out of step (gloo ended this process: " + (reason or b"a transfer failed") + b")")
    put(ours + b"error: --distributed: " + what + b"; continue with the same command and --resume on every process\n")
"""


def _guard_stderr() -> None:
    """Routes file descriptor 2 through the stderr guard (``_GUARD``), for the rest of this process."""
    global _guard
    prog = interrupts._state.get("prog") or "jaxcifar"
    original = os.dup(2)
    try:
        _guard = subprocess.Popen(
            [sys.executable, "-c", _GUARD, str(prog), str(jax.process_count())],
            stdin=subprocess.PIPE,
            stdout=original,
            start_new_session=True,  # Ctrl-C in a terminal reaches this process, not its guard
        )
    except OSError as e:
        log.warning("no stderr guard (%s): when process 0 dies, JAX may print its own lines before this one's", e)
        return
    finally:
        os.close(original)
    sys.stderr.flush()
    os.dup2(_guard.stdin.fileno(), 2)  # type: ignore[union-attr]
    _guard.stdin.close()  # type: ignore[union-attr]


_guard: subprocess.Popen[bytes] | None = None


def _allgather(values: np.ndarray) -> np.ndarray:
    """Returns (process_count, ...) int32: ``values`` of every process (one small collective)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def every_process(ok: bool) -> bool:
    """Returns True when ``ok`` is True in every process of a multi-process run (one small collective, which
    every process must reach); ``ok`` itself in a single-process run."""
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return ok
    with _quiet_stdout():
        return bool(_allgather(np.array([int(ok)], np.int32)).min())


def config_fingerprint(config: Any) -> tuple[list[str], np.ndarray]:
    """Returns (field names, int32 hash of each field's value) of ``config``, without the process-local fields."""
    values = config.to_dict()
    names = sorted(k for k in values if k not in PROCESS_LOCAL_FIELDS)
    digest = [zlib.crc32(json.dumps(values[k], sort_keys=True, default=str).encode()) & 0x7FFFFFFF for k in names]
    return names, np.array(digest, np.int32)


def check_same_config(config: Any) -> None:
    """Raises ConfigError, in every process alike, when the processes' configurations differ (one collective:
    the hashes of every field are gathered); the message names the fields and the processes."""
    names, digest = config_fingerprint(config)
    key = digest.tobytes()
    if key in _watch.checked:
        return
    with _quiet_stdout():
        every = _allgather(digest)
    differ = [name for i, name in enumerate(names) if len(set(every[:, i].tolist())) > 1]
    if differ:
        odd = [p for p in range(every.shape[0]) if not np.array_equal(every[p], every[0])]
        flags = ", ".join("--" + name.replace("_", "-") for name in differ)
        raise ConfigError(
            f"--distributed: the processes' configs differ: process {', '.join(map(str, odd))} differs from process 0 "
            f"in {flags}; start every process with the same flags (only --data-dir may differ)"
        )
    _watch.checked.add(key)


def data_fingerprint(*arrays: np.ndarray) -> np.ndarray:
    """Returns int32 (3 * len(arrays),): the length, byte count and CRC-32 of each array (host memory, ~1 GB/s)."""
    values = []
    for array in arrays:
        data = np.ascontiguousarray(array)
        values += [len(data), data.nbytes, zlib.crc32(memoryview(data).cast("B"))]
    return np.array([v & 0x7FFFFFFF for v in values], np.int32)


def data_mismatch(what: str, every: np.ndarray) -> str | None:
    """Returns the one-line error for ``every`` (process_count, k) int32 ``data_fingerprint``s of ``what``
    (e.g. ``the train split``) gathered from every process, or None when all processes hold the same data."""
    odd = [p for p in range(every.shape[0]) if not np.array_equal(every[p], every[0])]
    if not odd:
        return None
    sizes = ", ".join(f"process {p}: {int(every[p, 0])}" for p in [0, *odd])
    return (
        f"--distributed: the processes hold different data for {what}: process {', '.join(map(str, odd))} loaded other "
        f"images or labels than process 0 (images {sizes}); every process must load the same data: give every host "
        "the same files (--data-dir may differ, its contents may not)"
    )


def check_same_data(what: str, *arrays: np.ndarray) -> None:
    """Raises DataError, in every process alike, when the processes of a multi-process run hold different
    ``arrays`` for ``what`` (one collective on their ``data_fingerprint``s). Nothing to do in one process. For
    host data about to be replicated over every process's devices (``jax.device_put`` would otherwise fail with
    every process's arrays printed in full)."""
    if jax.process_count() == 1:
        return
    with _quiet_stdout():
        every = _allgather(data_fingerprint(*arrays))
    message = data_mismatch(what, every)
    if message is not None:
        raise DataError(message)


# --- the end ------------------------------------------------------------------------------------------------


def finish_distributed() -> None:
    """Ends this process's part of a run that went well, once every process got here: each tells process 0
    it is done, process 0 answers when all are (meanwhile a lost process is still noticed, however long
    process 0's report takes), then ``jax.distributed.shutdown()``. Without it, the first process to exit
    would be taken for lost by the others. Nothing to do in a single-process run."""
    if _watch.started is None or _watch.finished:
        return
    if jax.process_index() == 0:
        _watch.wait_done(lambda: set(_watch.peers) <= _watch.done)
        _watch.send_all("done")
    elif 0 in _watch.peers:
        _watch.send_all("done")
        _watch.wait_done(lambda: 0 in _watch.done)
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()  # now quick: JAX's own shutdown barrier gives up after 5 minutes
    _watch.finished = True


def _excepthook(previous: Callable[..., Any]) -> Callable[..., Any]:
    """Returns a ``sys.excepthook`` for a multi-process run. An uncaught exception there is most often a
    collective that failed because another process died (gloo raises at once on jax 0.12): first the watchdog
    gets the time to say so in its line and end the process. Otherwise the traceback is printed and the
    process ends at once: the interpreter's teardown could wait forever on the dead process's connections."""

    def hook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        if _watch.finished:
            previous(kind, error, tb)
            return
        time.sleep(LOST_GRACE_SECONDS + 1.0)
        previous(kind, error, tb)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _end(None, 1)

    return hook


def _finish_at_exit() -> None:
    if getattr(sys, "last_value", None) is None:  # not after an uncaught exception: the others must see a loss
        finish_distributed()


# --- the watchdog -------------------------------------------------------------------------------------------


class _Watch:
    """TCP connections between process 0 (hub) and every other process, carrying lines: ``ping``, ``done``
    (this process finished well) and, from the hub, ``lost K HOW``; a connection closed before ``done``
    means its process is gone."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.finished = False
        self.checked: set[bytes] = set()
        self.server: socket.socket | None = None
        self.peers: dict[int, socket.socket] = {}  # process -> connection (process 0: all others; else: 0)
        self.done: set[int] = set()
        self.send_lock = threading.Lock()
        self.changed = threading.Condition()

    def listen(self) -> int:
        """Process 0: listens on a free port for the other processes; returns the port (0 when it cannot)."""
        try:
            if socket.has_ipv6:
                self.server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
            else:
                self.server = socket.create_server(("", 0))
        except OSError:
            try:
                self.server = socket.create_server(("", 0))
            except OSError as e:
                log.warning("no peer watchdog: cannot listen (%s)", e)
                return 0
        return int(self.server.getsockname()[1])

    def connect(self, port: int) -> None:
        peer_timeout = _seconds(PEER_TIMEOUT_ENV, PEER_TIMEOUT_DEFAULT)
        if port == 0:
            log.warning("no peer watchdog: process 0 could not listen; a lost process is noticed by JAX's heartbeat")
            return
        if jax.process_index() == 0:
            threading.Thread(target=self._accept, args=(peer_timeout,), name="jaxcifar-peers", daemon=True).start()
        else:
            host = _coordinator_host()
            try:
                conn = socket.create_connection((host, port), timeout=30)
                conn.sendall(f"hello {jax.process_index()}\n".encode())
            except OSError as e:
                log.warning("no peer watchdog: cannot reach process 0 at %s:%d (%s)", host, port, e)
                return
            self._watch_peer(0, conn, peer_timeout)
        threading.Thread(target=self._ping, args=(peer_timeout / 6,), name="jaxcifar-ping", daemon=True).start()

    def _accept(self, peer_timeout: float) -> None:
        assert self.server is not None
        self.server.settimeout(_seconds(INIT_TIMEOUT_ENV, INIT_TIMEOUT_DEFAULT))
        waiting = set(range(1, jax.process_count()))
        while waiting:
            try:
                conn, _ = self.server.accept()
                conn.settimeout(30)
                hello = conn.recv(64).decode(errors="replace").split()
                process = int(hello[1])
            except (OSError, ValueError, IndexError) as e:
                log.warning("peer watchdog: processes %s did not connect (%s)", sorted(waiting), e)
                return
            waiting.discard(process)
            self._watch_peer(process, conn, peer_timeout)

    def _watch_peer(self, process: int, conn: socket.socket, peer_timeout: float) -> None:
        conn.settimeout(peer_timeout)
        with self.send_lock:
            self.peers[process] = conn
        threading.Thread(
            target=self._read, args=(process, conn, peer_timeout), name=f"jaxcifar-peer-{process}", daemon=True
        ).start()

    def _read(self, process: int, conn: socket.socket, peer_timeout: float) -> None:
        pending = b""
        while True:
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                if process in self.done:  # it waits for the others to finish
                    continue
                self.lost(
                    process,
                    f"nothing heard from it for {peer_timeout:g} s ({PEER_TIMEOUT_ENV}): it hangs, or "
                    "its host or the network failed",
                )
                return
            except OSError:
                chunk = b""
            if not chunk:
                if process not in self.done:
                    how = "its connection closed: it ended with an error or interrupt (see its output), or was killed"
                    # Process 0's death also ends the coordination service, and JAX then aborts this process
                    # within about 0.4 s (measured): no grace period for it.
                    self.lost(process, how, grace=process != 0)
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                word, _, rest = line.decode(errors="replace").partition(" ")
                if word == "done":
                    with self.changed:
                        self.done.add(process)
                        self.changed.notify_all()
                elif word == "lost" and process == 0:  # the hub relays a loss it noticed
                    number, _, how = rest.partition(" ")
                    self.lost(int(number), how, relayed=True)

    def wait_done(self, ready: Callable[[], bool]) -> None:
        """Returns once ``ready()`` (a peer's ``done`` arrives); a lost peer ends the process meanwhile."""
        with self.changed:
            self.changed.wait_for(ready)

    def _ping(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.send_all("ping")

    def send_all(self, line: str, skip: int | None = None) -> None:
        data = (line + "\n").encode()
        with self.send_lock:
            peers = list(self.peers.items())
        for process, conn in peers:
            if process != skip:
                with contextlib.suppress(OSError):
                    conn.sendall(data)

    def lost(self, process: int, how: str, grace: bool = False, relayed: bool = False) -> None:
        """Ends this process with one line naming the lost ``process`` (unless it is already ending)."""
        if self.finished:
            return
        if grace:
            time.sleep(LOST_GRACE_SECONDS)
        if jax.process_index() == 0 and not relayed:
            self.send_all(f"lost {process} {how}", skip=process)
        message = f"lost process {process} of {jax.process_count()} ({how})"
        _end(f"--distributed: {message}; {_what_is_saved()}", 1)


_watch = _Watch()


def _coordinator_host() -> str:
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    with contextlib.suppress(Exception):  # where jax.distributed connected (also when it was auto-detected)
        from jax._src import distributed

        address = distributed.global_state.coordinator_address or address
    host = (address or "localhost").rsplit(":", 1)[0]
    return host.strip("[]")


def _what_is_saved() -> str:
    describe_saved = interrupts._state.get("describe")  # what the command says it has saved, as on Ctrl-C
    try:
        return str(describe_saved()) if callable(describe_saved) else "see the run's workdir"
    except Exception as e:
        return f"({e.__class__.__name__} while checking what is saved)"


def _end(message: str | None, code: int) -> None:
    """Prints ``PROG: error: message`` on stderr (nothing when ``message`` is None) and ends the process at once
    (from any thread), unless the process is already ending (its own error or interrupt line said the last word)."""
    if not interrupts._ending.acquire(blocking=False):
        return
    try:
        if message is not None:
            prog = interrupts._state.get("prog") or "jaxcifar"
            console.write_line(2, " ".join(f"{prog}: error: {message}".split()))
    finally:  # the process ends whatever the line did (a closed stderr, a name that is not UTF-8)
        os._exit(code)
