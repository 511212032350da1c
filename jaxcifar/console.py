"""A command's console: printing never ends a run, and nothing printed can fail on a name that is not UTF-8.

A command's output is a courtesy to whoever watches: a reader that went away (``train ... | head -n 2``), a full
disk behind ``> log``, a closed terminal or a closed stderr must not end a training run, nor keep an interrupt
from ending it. ``guard(prog)``, from a command's start-up (``jaxcifar.interrupts.install``), replaces
``sys.stdout`` and ``sys.stderr`` by ``GuardedStream``s: every ``print``, ``tqdm`` line and log record of the
process goes through them. The first write that fails (``OSError``: EPIPE, ENOSPC, EIO; ``ValueError``: a
closed file) drops the stream: its file descriptor is pointed at ``/dev/null`` (so that later writes from C++
libraries or child processes cannot fail either), nothing more is written to it, and the command goes on. A
dropped stdout is named once on stderr.

This module imports only the standard library (``interrupts`` uses it before the heavy imports).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, TextIO


def printable(text: str) -> str:
    """Returns ``text`` printable on any UTF-8 console: the bytes of a name that is not UTF-8 (which Python
    carries as surrogate escapes, e.g. ``'bad\\udcffname'``) written as ``\\xff`` (``'bad\\xffname'``)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no byte produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def write_line(fd: int, text: str) -> bool:
    """Writes ``printable(text)`` and a newline to the file descriptor ``fd``; returns whether all of it was
    written. Never raises: for the last words of a process, which must end whatever its console does."""
    try:
        data = (printable(text) + "\n").encode("utf-8")
        while data:
            data = data[os.write(fd, data) :]
    except Exception:
        return False
    return True


class GuardedStream:
    """A text stream (``sys.stdout``, ``sys.stderr``) whose writes never raise: a text that the stream cannot
    encode is written ``printable``, and after the first failed write or flush the stream is dropped (see the
    module). Everything else (``fileno``, ``isatty``, ``encoding``, ``buffer``, ...) is the wrapped stream's."""

    def __init__(self, stream: TextIO, name: str, on_drop: Any = None):
        self._stream = stream
        self._name = name
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self.dropped: str | None = None  # why the stream was dropped (the OS error), None while it works

    def write(self, text: str) -> int:
        if self.dropped is None:
            try:
                try:
                    self._stream.write(text)
                except UnicodeEncodeError:  # the text encoder's own error: nothing of the text was written
                    self._stream.write(printable(text))
            except (OSError, ValueError) as e:
                self._drop(e)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.dropped is None:
            try:
                self._stream.flush()
            except (OSError, ValueError) as e:
                self._drop(e)

    def _drop(self, error: Exception) -> None:
        with self._lock:
            if self.dropped is not None:
                return
            self.dropped = getattr(error, "strerror", None) or str(error) or error.__class__.__name__
        try:  # what is still buffered, and what C++ or child processes write later, goes nowhere
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._stream.fileno())
            finally:
                os.close(null)
        except (OSError, ValueError, AttributeError):
            pass
        if self._on_drop is not None:
            self._on_drop(self._name, self.dropped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_state: dict[str, Any] = {"prog": ""}


def guard(prog: str) -> None:
    """Makes this process's ``sys.stdout`` and ``sys.stderr`` ``GuardedStream``s (once; for a command's
    ``__main__`` only): a failed write drops the stream instead of raising, and a dropped stdout is named in one
    line on stderr, ``PROG: warning: cannot write to stdout (REASON); going on without printing to it``."""
    _state["prog"] = prog
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream, name, _say_dropped))


def _say_dropped(name: str, reason: str) -> None:
    if name == "stdout":
        print(
            f"{_state['prog']}: warning: cannot write to stdout ({reason}); going on without printing to it",
            file=sys.stderr,
            flush=True,
        )
