"""The peer watchdog of a multi-process run: TCP connections between process 0 (the hub) and every other
process, so that a process that dies is noticed by the others within about a second.

A process that dies, by ``kill -9`` or after an error, closes its connection at once; the others end with
one line naming it (``interrupts.end``), instead of waiting in a collective until JAX's heartbeat timeout
aborts them with a stack trace. The connections carry lines: ``ping`` (every PEER / 6 s), ``done`` (this
process finished well) and, from the hub, ``lost K HOW``; a connection closed before ``done`` means its
process is gone. ``jaxcifar.distributed`` starts it (``WATCH``) and ends it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import jax

from jaxcifar import interrupts
from jaxcifar.errors import ConfigError

log = logging.getLogger(__name__)

# Seconds, overridable by the environment (there are no flags for them: they are properties of the cluster,
# not of the run). INIT: how long ``jax.distributed.initialize`` may wait for every process to join (JAX's
# default is 300 s too: hosts of a pod can start minutes apart), and process 0 for the others to connect.
# PEER: how long a process may send nothing (it pings every PEER / 6 s) before the others give it up, for
# failures that leave its connection open (a host that loses power or network); a killed or failed process
# is noticed at once, whatever this is.
INIT_TIMEOUT_ENV, INIT_TIMEOUT_DEFAULT = "JAXCIFAR_DISTRIBUTED_INIT_TIMEOUT", 300.0
PEER_TIMEOUT_ENV, PEER_TIMEOUT_DEFAULT = "JAXCIFAR_DISTRIBUTED_PEER_TIMEOUT", 60.0
# After a peer's connection closes, wait this long before ending: when every process fails alike (the same
# bad value), each one's own error line wins over a "lost process" line.
LOST_GRACE_SECONDS = 1.0


def env_seconds(name: str, default: float) -> float:
    """Returns the positive, finite number of seconds in environment variable ``name`` (``default`` when it is
    unset); ConfigError naming it otherwise."""
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


class Watchdog:
    """This process's connections to its peers (process 0: to all others; else: to process 0), their reader
    threads, and which peers said ``done``. ``finished`` is set once the run ended well on every process:
    a connection closing after that is no loss."""

    def __init__(self) -> None:
        self.finished = False
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
        """Connects this process to its peers: process 0 accepts the others on ``port`` (its ``listen``), every
        other process connects to it there; then pings them. ``port`` 0: no watchdog (with a warning)."""
        peer_timeout = env_seconds(PEER_TIMEOUT_ENV, PEER_TIMEOUT_DEFAULT)
        if port == 0:
            log.warning("no peer watchdog: process 0 could not listen; a lost process is noticed by JAX's heartbeat")
            return
        if jax.process_index() == 0:
            threading.Thread(target=self._accept, args=(peer_timeout,), name="jaxcifar-peers", daemon=True).start()
        else:
            host = coordinator_host()
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
        self.server.settimeout(env_seconds(INIT_TIMEOUT_ENV, INIT_TIMEOUT_DEFAULT))
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
                self._take(process, line)

    def _take(self, process: int, line: bytes) -> None:
        """Acts on one line from ``process``: ``done``, or (from the hub) a relayed ``lost K HOW``."""
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

    def finish(self) -> None:
        """Returns once every process said ``done``: each tells process 0 it is done, process 0 answers when
        all are (meanwhile a lost process is still noticed, however long process 0's report takes)."""
        if jax.process_index() == 0:
            self.wait_done(lambda: set(self.peers) <= self.done)
            self.send_all("done")
        elif 0 in self.peers:
            self.send_all("done")
            self.wait_done(lambda: 0 in self.done)

    def _ping(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.send_all("ping")

    def send_all(self, line: str, skip: int | None = None) -> None:
        """Sends ``line`` to every peer but ``skip`` (a peer that is gone is skipped silently)."""
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
        interrupts.end(f"--distributed: {message}; {interrupts.what_is_saved()}", 1)


WATCH = Watchdog()  # this process's watchdog (one per process: a process takes part in one run)


def coordinator_host() -> str:
    """Returns the host of JAX's coordinator (where process 0 runs), without brackets or port."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    with contextlib.suppress(Exception):  # where jax.distributed connected (also when it was auto-detected)
        from jax._src import distributed

        address = distributed.global_state.coordinator_address or address
    host = (address or "localhost").rsplit(":", 1)[0]
    return host.strip("[]")
