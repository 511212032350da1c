"""Ctrl-C (SIGINT) and SIGTERM for the command lines: one line saying what is saved, exit 130 (143).

``install(prog)`` puts a watcher thread on the signal wakeup fd: Python's C-level signal handler
writes the signal number there at once, on whichever thread the kernel picked, so the watcher acts
within milliseconds even while the main thread sits inside XLA (a compile, a train step) and cannot run
Python signal handlers. The watcher prints ``PROG: interrupted: <what is saved>`` and ends the process
with ``os._exit`` without unwinding: a checkpoint being written survives this as it survives
``kill -9`` (orbax commits a checkpoint by renaming a finished temporary folder, and every other run
file is replaced atomically), and nothing can hang or crash on the way out. The ending never depends
on the line: it is written as well as the console allows (a name that is not UTF-8 shows as ``\xff``;
a closed or full stderr gets nothing), and ``os._exit`` follows whatever happened.

The same ending serves other threads that must stop the process at once (``jaxcifar.watchdog``: a lost
process of a multi-process run): ``end(message, code)``. Whichever comes first, an interrupt or such an
ending, says the last line; the others return without a word. ``prog()`` and ``what_is_saved()`` give
them the command's name and what it has saved, as the interrupt line says them.

This module imports only the standard library, so a command can install it before its heavy imports
(``jax`` takes seconds to import) and be interruptible from its first moment.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from jaxcifar import console

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

_state: dict[str, object] = {"installed": False, "prog": "", "describe": lambda: "nothing written yet"}
_ending = threading.Lock()


def install(prog: str) -> None:
    """Makes SIGINT/SIGTERM end this process with one line ``PROG: interrupted: <what is saved>``.

    For a command's ``__main__`` only (a library must not take over a notebook's or test runner's
    Ctrl-C); ``describe`` sets what the line says. Only from the main thread. Also guards the console
    (``console.guard``): a closed or full stdout or stderr no longer ends the command.
    """
    _state["prog"] = prog
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    try:  # complete lines reach a pipe or file before os._exit (which flushes nothing)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    console.guard(prog)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for signum in EXIT_CODES:
        # Runs in the main thread when it next executes Python; the watcher has usually ended the
        # process before that. It replaces the default KeyboardInterrupt.
        signal.signal(signum, lambda signum, frame: _end(signum))
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="jaxcifar-signals", daemon=True).start()
    _state["installed"] = True


def exit_with(main: Callable[[], int | None]) -> NoReturn:
    """Runs a command's ``main`` and ends the process with its exit code, without the interpreter's
    teardown: what the command writes is closed by then, and the teardown of XLA's and orbax's threads
    can only add delay or stray messages (``Task exception was never retrieved``) after the last line."""
    sys.excepthook = _quiet_excepthook
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    disarm()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


def _quiet_excepthook(kind: type[BaseException], error: BaseException, tb: object) -> None:
    """``sys.excepthook`` that drops orbax's stray 'Event loop is closed' (its tensorstore writers call back
    into a loop that a failed save closed); the command reports that failure in its own line."""
    if kind is RuntimeError and str(error) == "Event loop is closed":
        return
    sys.__excepthook__(kind, error, tb)  # type: ignore[arg-type]


def describe(what_is_saved: Callable[[], str]) -> None:
    """Sets the function that tells, at the moment of an interrupt, what is saved (for its line)."""
    _state["describe"] = what_is_saved


def disarm() -> None:
    """Ignores SIGINT/SIGTERM from now on (the command has said its last line and is exiting)."""
    if _state["installed"]:
        _ending.acquire(blocking=False)


def prog() -> str:
    """Returns the command's name given to ``install`` (e.g. ``python -m jaxcifar.train``), or ``jaxcifar``
    when no command installed this module (a library user, a test)."""
    return str(_state["prog"]) or "jaxcifar"


def what_is_saved() -> str:
    """Returns what the command says it has saved (the function given to ``describe``; ``nothing written
    yet`` before that). Never raises: an error while asking becomes ``(KIND while checking what is saved)``."""
    try:
        return str(_state["describe"]())  # type: ignore[operator]
    except Exception as e:  # the process must end whatever the description does
        return f"({e.__class__.__name__} while checking what is saved)"


def end(message: str | None, code: int) -> None:
    """Ends this process at once with exit ``code`` (``os._exit``, from any thread), after the line
    ``PROG: error: message`` on stderr (no line when ``message`` is None). Returns without doing anything
    when the process is already ending: an interrupt, another ``end`` or ``disarm`` said the last word."""
    _end_process(lambda: None if message is None else f"error: {message}", code)


def _watch(read_fd: int) -> None:
    while True:
        for signum in os.read(read_fd, 64):
            if signum in EXIT_CODES:
                _end(signum)


def _end(signum: int) -> None:
    _end_process(lambda: f"interrupted: {what_is_saved()}", EXIT_CODES.get(signum, 130))


def _end_process(words: Callable[[], str | None], code: int) -> None:
    """Writes ``PROG: <words()>`` (unless None) as one line on stderr and ends the process with ``code``,
    once: only the first caller (of any thread) gets here."""
    if not _ending.acquire(blocking=False):
        return
    try:
        text = words()
        if text is not None:
            console.write_line(2, " ".join(f"{prog()}: {text}".split()))
    finally:  # whatever the line did: ending never depends on printing
        os._exit(code)
