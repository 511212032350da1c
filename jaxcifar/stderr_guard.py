"""The stderr guard of a multi-process run: a small process that forwards this process's stderr, except the
last words of a process that a peer's death brings down before the watchdog (``jaxcifar.watchdog``) can speak.

When process 0 dies, its coordination service dies with it, and JAX's client in every other process logs
``E... coordination_service_agent.cc:...] Polled an error from coordination service`` (and ``W...
preemption_sync_manager.cc:...] Failed to retrieve preemption notice ...``; such lines are held for 0.5 s),
then ``F... client.h:...] Terminating process because the JAX distributed service detected fatal errors``
with a stack trace, and aborts; or gloo, inside a collective, gets half a message and aborts (``terminate
called after throwing an instance of 'gloo::EnforceNotMet'``). Both happen within microseconds of the moment
the watchdog hears of the death: which line comes first is a coin toss, and the abort may win. The guard
drops those lines, keeps the watchdog's (``PROG: ...``), and says the line itself when the process died
before the watchdog could (exit code 134, SIGABRT, in that case).

``start(prog, processes)`` runs this file as a script (``python -P stderr_guard.py PROG N``: the standard
library only, nothing of jaxcifar imported) and routes file descriptor 2 through it.
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

HOLD_SECONDS = 0.5  # how long a polled error line waits for the fatal line that would make it moot
POLLED = re.compile(rb"^[EW]\d{4} [\d:.]+ +\d+ (coordination_service_agent|preemption_sync_manager)\.cc:\d+\] ")
JAX_FATAL = re.compile(rb"^F\d{4} [\d:.]+ +\d+ \S+:\d+\] Terminating process because the JAX distributed service")
GLOO_FATAL = re.compile(rb"^terminate called after throwing an instance of 'gloo::")
STATUS = b"absl::Status:"
RESUME = b"; continue with the same command and --resume on every process\n"


def command(prog: str, processes: int) -> list[str]:
    """Returns the command line of a guard process: this file run as a script by this Python (``-P``: with the
    standard library only on its path)."""
    return [sys.executable, "-P", os.path.abspath(__file__), prog, str(processes)]


def start(prog: str, processes: int) -> subprocess.Popen[bytes] | None:
    """Routes file descriptor 2 of this process through a new guard process, for the rest of this process;
    returns the guard (None, with a warning, when it cannot start). ``prog`` starts the lines of ours that it
    keeps (``PROG: ...``), ``processes`` is the run's process count (for its own line)."""
    original = os.dup(2)
    try:
        guard = subprocess.Popen(
            command(prog, processes),
            stdin=subprocess.PIPE,
            stdout=original,
            start_new_session=True,  # Ctrl-C in a terminal reaches this process, not its guard
        )
    except OSError as e:
        log.warning("no stderr guard (%s): when process 0 dies, JAX may print its own lines before this one's", e)
        return None
    finally:
        os.close(original)
    sys.stderr.flush()
    os.dup2(guard.stdin.fileno(), 2)  # type: ignore[union-attr]
    guard.stdin.close()  # type: ignore[union-attr]
    return guard


class StderrFilter:
    """The guard's decisions, line by line: ``feed`` each complete line (with its newline), ``release`` when
    ``hold_seconds`` have passed with no input, ``close`` at the end of the input; kept lines go to ``put``."""

    def __init__(self, prog: bytes, processes: bytes, put: Callable[[bytes], None]) -> None:
        self.ours = prog + b": "
        self.processes = processes
        self.put = put
        self.held: list[bytes] = []  # polled error lines, waiting for a fatal line that would drop them
        self.since = 0.0  # when the first held line came (time.monotonic)
        self.dying = b""  # b"jax" or b"gloo" once a fatal line came: nothing more is forwarded
        self.status = b""  # the reason the fatal line (or its stack trace) gave
        self.said = False  # a line of ours came: the last word is said

    def hold_seconds(self, now: float) -> float | None:
        """Returns how long to wait for input before ``release`` (None: no line is held, wait for ever)."""
        return max(0.0, HOLD_SECONDS - (now - self.since)) if self.held else None

    def release(self) -> None:
        """Forwards the held lines (no fatal line followed them in time)."""
        self.put(b"".join(self.held))
        self.held = []

    def feed(self, line: bytes, now: float) -> None:
        """Takes one line of the process's stderr, received at ``now`` (time.monotonic)."""
        if line.startswith(self.ours):
            self.held, self.said = [], True
            self.put(line)
        elif self.dying:
            if not self.status and self.dying == b"jax" and STATUS in line:
                self.status = line.split(STATUS, 1)[1].strip()
            if not self.status and self.dying == b"gloo" and b"what():" in line:
                self.status = line.split(b"] ", 1)[-1].strip()
        elif JAX_FATAL.match(line) or GLOO_FATAL.match(line):
            self.held, self.dying = [], b"jax" if JAX_FATAL.match(line) else b"gloo"
            self.status = line.split(STATUS, 1)[1].strip() if STATUS in line else b""
        elif self.held or POLLED.match(line):
            self.since = self.since if self.held else now
            self.held.append(line)
        else:
            self.put(line)

    def close(self, pending: bytes) -> None:
        """Ends the input (``pending``: an unfinished last line): forwards what is held, or says the last
        words of a process that JAX or gloo ended before the watchdog spoke."""
        if pending and not self.dying:
            self.held.append(pending)
        if not self.dying:
            self.put(b"".join(self.held))
        elif not self.said:
            self.put(self.last_words())

    def last_words(self) -> bytes:
        """Returns the guard's own line for a process that JAX or gloo ended (``PROG: error: ...``)."""
        reason = self.status[:300]
        if self.dying == b"jax":
            what = (
                b"lost process 0 of " + self.processes + b" (it runs JAX's coordination service; JAX ended this "
                b"process: " + (reason or b"its coordination service failed") + b")"
            )
        else:
            what = (
                b"a collective across the " + self.processes + b" processes failed: another process died or is "
                b"out of step (gloo ended this process: " + (reason or b"a transfer failed") + b")"
            )
        return self.ours + b"error: --distributed: " + what + RESUME


def _put(data: bytes) -> None:
    try:
        os.write(1, data)
    except OSError:
        pass


def main(argv: list[str]) -> None:
    """The guard process: filters file descriptor 0 to 1 until the input ends. ``argv``: PROG, process count."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    guard = StderrFilter(argv[0].encode(), argv[1].encode(), _put)
    pending = b""
    while True:
        if not select.select([0], [], [], guard.hold_seconds(time.monotonic()))[0]:
            guard.release()
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            guard.feed(line + b"\n", time.monotonic())
    guard.close(pending)


if __name__ == "__main__":
    main(sys.argv[1:])
