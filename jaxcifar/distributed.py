"""The start, checks and end of a multi-process (multi-host) run (``--distributed``).

``initialize`` calls ``jax.distributed.initialize`` within a bounded time, checks with one collective that
every process runs the same configuration, routes stderr through the guard (``jaxcifar.stderr_guard``) and
connects the processes by the watchdog (``jaxcifar.watchdog``: a process that dies ends the others within
about a second with one line naming it). ``finish`` ends a run that went well on every process together.
``every_process`` and ``check_same_data`` are the small collectives the run takes decisions with.
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

from jaxcifar import interrupts, mesh, stderr_guard
from jaxcifar.errors import ConfigError, DataError, JaxcifarError
from jaxcifar.watchdog import (
    INIT_TIMEOUT_DEFAULT,
    INIT_TIMEOUT_ENV,
    LOST_GRACE_SECONDS,
    PEER_TIMEOUT_DEFAULT,
    PEER_TIMEOUT_ENV,
    WATCH,
    env_seconds,
)

log = logging.getLogger(__name__)

# Config fields that may differ between the processes of one run: where each host finds its copy of the data.
PROCESS_LOCAL_FIELDS = ("data_dir", "download")


class DistributedError(JaxcifarError):
    """The processes of a multi-process run could not start, or lost one another."""


class _Run:
    """This process's part of the run: when ``initialize`` finished (None: not yet), the configurations
    already checked equal on every process (their hashes), and the stderr guard."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.checked: set[bytes] = set()
        self.guard: subprocess.Popen[bytes] | None = None


_RUN = _Run()


def is_main_process() -> bool:
    """True in process 0, the one that writes the run's files (and in a single-process run). Does not start
    the JAX backend when ``jax.distributed`` is not initialized (so it can be asked before that)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


# --- start-up -----------------------------------------------------------------------------------------------


def initialize(config: Any = None) -> None:
    """Starts a multi-process run, once per process: ``jax.distributed.initialize()`` (arguments
    auto-detected on Cloud TPU, Slurm and Open MPI, or from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), then the peer watchdog. With ``config`` (a ``Config``),
    also checks that every process runs the same configuration (ConfigError naming the fields that differ).

    Every failure ends in one line: a busy coordinator port, a coordinator that does not answer or
    processes that do not all join within ``JAXCIFAR_DISTRIBUTED_INIT_TIMEOUT`` seconds (the process
    then ends at once, exit code 1: ``jax.distributed.initialize`` cannot be interrupted)."""
    if _RUN.started is None:
        if not jax.distributed.is_initialized():
            _initialize()
        _RUN.started = time.time()
        if jax.process_count() > 1:
            _RUN.guard = stderr_guard.start(interrupts.prog(), jax.process_count())
        with _quiet_stdout():  # gloo prints "[Gloo] Rank 0 is connected to 1 peer ranks..." as it connects
            port = WATCH.listen() if jax.process_index() == 0 and jax.process_count() > 1 else 0
            ports = _allgather(np.array([port], np.int32))
            _connect_devices()  # while stdout is quiet
        if jax.process_count() > 1:
            WATCH.connect(int(ports[0, 0]))
            atexit.register(_finish_at_exit)  # a script that ends normally (the command line calls it itself)
            sys.excepthook = _excepthook(sys.excepthook)
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    if config is not None:
        check_same_config(config)


def _connect_devices() -> None:
    """Opens the connections the train step's all-reduce uses (gloo's, on CPU), with one tiny sum and one
    replicated transfer over the mesh of every device."""
    every = mesh.make_mesh()
    ones = jax.device_put(np.ones(every.devices.size, np.float32), mesh.batch_sharded(every))
    jax.block_until_ready(jax.jit(jax.numpy.sum, out_shardings=mesh.replicated(every))(ones))
    jax.block_until_ready(jax.device_put(np.zeros(1), mesh.replicated(every)))


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
    init_timeout = env_seconds(INIT_TIMEOUT_ENV, INIT_TIMEOUT_DEFAULT)
    peer_timeout = env_seconds(PEER_TIMEOUT_ENV, PEER_TIMEOUT_DEFAULT)
    where = f"the coordinator {address}" if address else "the coordinator"
    # JAX's own limits are set beyond ours: past them it aborts the process with a stack trace
    # (SIGABRT, "Terminating process because the JAX distributed service detected fatal errors").
    message = _init_timeout_message(where, kwargs, init_timeout)
    timer = threading.Timer(init_timeout, interrupts.end, args=(message, 1))
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


# --- checks across the processes ----------------------------------------------------------------------------


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
    if key in _RUN.checked:
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
    _RUN.checked.add(key)


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


def finish() -> None:
    """Ends this process's part of a run that went well, once every process got here (``Watchdog.finish``),
    then ``jax.distributed.shutdown()``. Without it, the first process to exit would be taken for lost by the
    others. Nothing to do in a single-process run."""
    if _RUN.started is None or WATCH.finished:
        return
    WATCH.finish()
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()  # now quick: JAX's own shutdown barrier gives up after 5 minutes
    WATCH.finished = True


def _excepthook(previous: Callable[..., Any]) -> Callable[..., Any]:
    """Returns a ``sys.excepthook`` for a multi-process run. An uncaught exception there is most often a
    collective that failed because another process died (gloo raises at once on jax 0.12): first the watchdog
    gets the time to say so in its line and end the process. Otherwise the traceback is printed and the
    process ends at once: the interpreter's teardown could wait forever on the dead process's connections."""

    def hook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        if WATCH.finished:
            previous(kind, error, tb)
            return
        time.sleep(LOST_GRACE_SECONDS + 1.0)
        previous(kind, error, tb)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        interrupts.end(None, 1)

    return hook


def _finish_at_exit() -> None:
    if getattr(sys, "last_value", None) is None:  # not after an uncaught exception: the others must see a loss
        finish()
