"""A run's workdir: its lock, and what is committed in it.

One command at a time per workdir: a run (``jaxcifar.run``, ``fit``) and an LR range test hold an
exclusive ``flock`` on ``WORKDIR/.lock`` (which also holds the owner's pid) from before they read or
decide anything about the workdir until they end; a report holds a shared one (several may read a
finished run at once, none while a run writes it). The kernel releases the lock when its process ends in
any way (``kill -9`` included), so a lock left by a killed run is taken over by the next one.

``describe_saved`` reads what is committed from the disk alone (``layout.RunDir``), so it can answer at any
moment (it is what an interrupted command reports).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxcifar.errors import CheckpointError
from jaxcifar.files import check_name
from jaxcifar.layout import LOCK_NAME, RunDir


def check_workdir(workdir: str | Path) -> Path:
    """Returns ``workdir`` as a Path; ConfigError when its name cannot hold a run (``files.check_name``: too long,
    not UTF-8), CheckpointError when it exists and is not a folder."""
    path = check_name(workdir, "--workdir")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"--workdir {path} is a file, not a folder")
    return path


def in_use_message(workdir: Path, owner: str) -> str:
    """Returns the refusal for a workdir whose lock another process holds (``owner``: the pid in its lock file)."""
    alive = False
    if owner.isdigit():
        try:
            os.kill(int(owner), 0)
            alive = int(owner) != os.getpid()
        except PermissionError:
            alive = True
        except (OSError, OverflowError):
            alive = False
    who = f"another run (pid {owner})" if alive else "another command (a report reading it, or a process elsewhere)"
    return f"--workdir {workdir} is in use by {who}; wait for it to end or choose another --workdir"


@dataclasses.dataclass
class _Hold:
    """This process's hold on one workdir's lock: the open lock file, its mode, how many ``acquire``s it
    answers (``WorkdirLock`` is re-entrant in its thread), what ``acquire`` created (removed again at the
    end unless the command claimed the workdir) and whether it did."""

    fd: int
    shared: bool
    thread: int
    pid: int
    count: int = 1
    created: list[Path] = dataclasses.field(default_factory=list)
    claimed: bool = False  # this process's pid is in the lock file: the command writes the workdir


_holds: dict[str, _Hold] = {}  # realpath of a workdir -> this process's hold on it
_holds_guard = threading.Lock()


class WorkdirLock:
    """A lock on a workdir for the life of one command (``with WorkdirLock(dir):``).

    Exclusive (a run, an LR range test: they write the workdir) or ``shared`` (a report: it reads the run;
    several may read at once). Re-entrant in one thread: ``jaxcifar.run`` holds it over the LR range test,
    ``fit`` and the report, which take it again; another thread or process is refused.
    """

    def __init__(self, workdir: str | Path, shared: bool = False):
        self.workdir = Path(workdir)
        self.path = RunDir(self.workdir).lock
        self.shared = shared
        self._hold: _Hold | None = None

    def acquire(self, claim: bool = True) -> None:
        """Takes the lock. An exclusive one also creates the workdir (and parents) when needed and, with
        ``claim``, writes this process's pid into ``WORKDIR/.lock`` (else ``claim_workdir`` does, once the
        command knows it will write the workdir); a shared one changes nothing on disk (and locks nothing where
        no run ever made a ``.lock``). Raises CheckpointError when another process, or another thread of this
        one, holds the lock in a mode that excludes this one, or when the workdir cannot be made."""
        check_workdir(self.workdir)
        key = os.path.realpath(self.workdir)
        with _holds_guard:
            hold = _holds.get(key)
            if hold is not None and hold.pid == os.getpid() and hold.thread == threading.get_ident():
                if hold.shared and not self.shared:
                    raise CheckpointError(f"--workdir {self.workdir} is held for reading only by this command")
                hold.count += 1
                self._hold = hold
            else:
                self._hold = self._take()
                if self._hold is not None:
                    _holds[key] = self._hold
        if claim and not self.shared:
            claim_workdir(self.workdir)

    def _take(self) -> _Hold | None:
        created = [] if self.shared else _make_dirs(self.workdir)
        for _ in range(10):  # again when the lock file was removed between our open and our flock
            try:
                if self.shared:
                    fd = os.open(self.path, os.O_RDONLY)
                else:
                    try:
                        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                        created.append(self.path)
                    except FileExistsError:
                        fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                if self.shared:
                    return None
                created += _make_dirs(self.workdir)
                continue
            except OSError as e:
                raise CheckpointError(f"cannot open the lock file {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(in_use_message(self.workdir, owner)) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if not same:  # a command that ended removed the lock file it had made: take the new one
                os.close(fd)
                continue
            return _Hold(fd, self.shared, threading.get_ident(), os.getpid(), created=created)
        raise CheckpointError(f"cannot take the lock {self.path}: its file keeps being replaced")

    def release(self) -> None:
        """Releases the lock (at the outermost ``release`` of a re-entrant hold). A command that never claimed
        the workdir (it refused, or found nothing to do), or that made it and wrote nothing into it (it failed
        first), leaves no trace: the lock file and the folders ``acquire`` created are removed again (the
        folders when empty)."""
        hold, self._hold = self._hold, None
        if hold is None:
            return
        with _holds_guard:
            hold.count -= 1
            if hold.count > 0:
                return
            _holds.pop(os.path.realpath(self.workdir), None)
        if not hold.claimed or (self.path in hold.created and os.listdir(self.workdir) == [LOCK_NAME]):
            with contextlib.suppress(OSError):
                if self.path in hold.created:
                    os.unlink(self.path)  # while locked: a process that opened it meanwhile sees it replaced (_take)
                for folder in reversed([p for p in hold.created if p != self.path]):
                    os.rmdir(folder)
        with contextlib.suppress(OSError):
            fcntl.flock(hold.fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(hold.fd)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_workdir(workdir: str | Path) -> None:
    """Writes this process's pid into the lock file of ``workdir``, whose exclusive lock this thread holds: from
    now on the command writes the workdir, and a refused command names this pid. Nothing when this thread does
    not hold it (the other processes of a multi-process run: process 0 holds it)."""
    with _holds_guard:
        hold = _holds.get(os.path.realpath(workdir))
        mine = hold is not None and hold.pid == os.getpid() and hold.thread == threading.get_ident()
        if not mine or hold.shared or hold.claimed:
            return
        try:
            os.ftruncate(hold.fd, 0)
            os.pwrite(hold.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            path = RunDir(workdir).lock
            raise CheckpointError(f"cannot write the lock file {path}: {e.strerror or e}") from None
        hold.claimed = True


def _make_dirs(folder: Path) -> list[Path]:
    """Creates ``folder`` and its missing parents; returns the ones it created, outermost first.
    Raises CheckpointError naming the folder when it cannot be created."""
    missing = []
    for path in [folder, *folder.parents]:
        if path.exists():
            break
        missing.append(path)
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:
            pass
        except OSError as e:
            raise CheckpointError(f"--workdir {folder}: cannot create the folder ({e.strerror or e})") from None
    return created


@contextlib.contextmanager
def holding(
    workdir: str | Path, *, is_main: bool = True, every_process: Callable[[bool], bool] = bool
) -> Iterator[Path]:
    """Holds ``workdir``'s exclusive lock while the block runs (a command that writes it); yields the Path.

    Taken before anything is read from or decided about the workdir (fresh run or resume). In a
    multi-process run process 0 takes it (it writes the run's files) and every process goes on only once
    it has it (one collective); a refusal ends every process with a CheckpointError. Re-entrant as
    ``WorkdirLock``. ``is_main`` and ``every_process`` come from ``jaxcifar.distributed`` (``is_main_process()``,
    ``every_process``); the defaults are a single process's (this module does not import ``distributed``, so
    the lock's code uses no jax). The command calls ``claim_workdir`` once it has decided to write the
    workdir; until then the lock leaves no trace on disk."""
    path = check_workdir(workdir)
    lock = WorkdirLock(path) if is_main else None
    refusal = None
    if lock is not None:
        try:
            lock.acquire(claim=False)
        except CheckpointError as e:
            refusal = e
    if not every_process(refusal is None):
        raise refusal or CheckpointError(
            f"--workdir {path} is in use by another run (process 0 of this run could not take its lock)"
        )
    try:
        yield path
    finally:
        if lock is not None:
            lock.release()


def describe_saved(workdir: str | Path, epochs: int | None = None, report: bool = False) -> str:
    """Returns what a resume of ``workdir`` would continue from, for the line an interrupt prints. With the
    run's ``epochs`` and ``report`` (``--report``): that the report is what is left, once every epoch is saved."""
    rundir = RunDir(workdir)
    epoch = rundir.saved_epochs()
    if epoch == 0:
        return f"no epoch finished yet; nothing to resume in {workdir}"
    saved = "epoch 1" if epoch == 1 else f"epochs 1-{epoch}"
    if report and epochs is not None and epoch >= epochs and not rundir.report_written():
        return f"{saved} saved in {workdir}, the report not written; the same command with --resume writes it"
    return f"{saved} saved in {workdir}; continue with the same command and --resume"
