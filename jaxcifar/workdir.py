"""A run's workdir: its lock, and what is committed in it.

One run at a time per workdir: ``WorkdirLock`` holds an exclusive ``flock`` on ``WORKDIR/.lock``,
which also holds the owner's pid. The kernel releases the lock when its process ends in any way
(``kill -9`` included), so a lock left by a killed run is taken over by the next one.

A checkpoint is committed when orbax has renamed its temporary folder to ``checkpoints/<step>``;
``saved_epochs`` reads what is committed from the disk alone, so it can answer at any moment (it is
what an interrupted command reports).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from jaxcifar.errors import CheckpointError
from jaxcifar.files import check_name

LOCK_NAME = ".lock"


def check_workdir(workdir: str | Path) -> Path:
    """Returns ``workdir`` as a Path; ConfigError when its name cannot hold a run (``files.check_name``: too long,
    not UTF-8), CheckpointError when it exists and is not a folder."""
    path = check_name(workdir, "--workdir")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"--workdir {path} is a file, not a folder")
    return path


class WorkdirLock:
    """An exclusive lock on a workdir for the life of one run (``with WorkdirLock(dir):``)."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock and writes this process's pid into it.

        Raises CheckpointError naming the owner's pid when another live process holds it.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"--workdir {self.path.parent} is in use by another run (pid {owner}); wait for it to end or "
                "choose another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (the file stays; the next run takes it over)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_not_in_use(workdir: str | Path) -> None:
    """Raises CheckpointError when a live run holds ``workdir``'s lock; changes nothing on disk."""
    path = Path(workdir) / LOCK_NAME
    if not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise CheckpointError(
            f"--workdir {path.parent} is in use by another run (pid {owner}); wait for it to end or "
            "choose another --workdir"
        ) from None
    finally:
        os.close(fd)


def committed_steps(directory: str | Path) -> list[int]:
    """Returns the sorted steps of the committed checkpoints in an orbax folder ([] when none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def checkpoint_meta(checkpoint: str | Path) -> dict[str, Any] | None:
    """Returns the run metadata (epoch, step, history, best) that ``checkpoint.Checkpointer`` stores in a
    checkpoint folder (orbax's ``JsonSave`` writes it to ``meta/metadata``), or None when unreadable."""
    try:
        meta = json.loads((Path(checkpoint) / "meta" / "metadata").read_text())
        int(meta["epoch"])
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saved_epochs(workdir: str | Path) -> int:
    """Returns the newest epoch with a committed, readable checkpoint in ``workdir`` (0 when none)."""
    directory = Path(workdir) / "checkpoints"
    for step in reversed(committed_steps(directory)):
        meta = checkpoint_meta(directory / str(step))
        if meta is not None:
            return int(meta["epoch"])
    return 0


def describe_saved(workdir: str | Path) -> str:
    """Returns what a resume of ``workdir`` would continue from, for the line an interrupt prints."""
    epoch = saved_epochs(workdir)
    if epoch == 0:
        return f"no epoch finished yet; nothing to resume in {workdir}"
    epochs = "epoch 1" if epoch == 1 else f"epochs 1-{epoch}"
    return f"{epochs} saved in {workdir}; continue with the same command and --resume"
