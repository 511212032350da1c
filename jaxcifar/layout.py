"""The files of a run's workdir, named in one place: ``RunDir(path)``.

Every module that reads or writes a workdir asks a ``RunDir`` for the path (``RunDir(w).checkpoints``,
``RunDir(w).config_json``, ...) instead of spelling the name; docs/workdir.md documents each one, and
tests/test_docs.py checks that the two agree. Besides the names, ``RunDir`` answers what is committed in
the workdir from the disk alone (no jax, no orbax): whether it holds a checkpoint, the newest one's
metadata, the saved Config and history.

A checkpoint is committed when orbax has renamed its temporary folder to ``checkpoints/<step>``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxcifar.config import Config
from jaxcifar.errors import CheckpointError, JaxcifarError, RunFileError
from jaxcifar.files import read_json

LOCK_NAME = ".lock"


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


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A run's workdir: the path of each file a run, an LR range test or a report writes there."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_json(self) -> Path:
        """The run's Config (``Config.save``), written when a fresh run starts."""
        return self.path / "config.json"

    @property
    def history_json(self) -> Path:
        """One record per finished epoch, each listed once its checkpoint is committed."""
        return self.path / "history.json"

    @property
    def checkpoints(self) -> Path:
        """orbax folder of the latest ``--keep-checkpoints`` states (``STEP/``)."""
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        """orbax folder of the state with the best selection accuracy."""
        return self.path / "best"

    @property
    def unreadable_checkpoints(self) -> Path:
        """Where a resume sets aside the checkpoints it could not read (``STEP-TIME/``)."""
        return self.path / "unreadable-checkpoints"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (the run's scalars, the report's images)."""
        return self.path / "tensorboard"

    @property
    def lock(self) -> Path:
        """The lock file (``workdir.WorkdirLock``: ``flock`` + the owner's pid)."""
        return self.path / LOCK_NAME

    @property
    def timing_json(self) -> Path:
        """Seconds per phase of the run."""
        return self.path / "timing.json"

    @property
    def lr_find_json(self) -> Path:
        """The LR range test's curve and suggestion (``--lr auto``, ``python -m jaxcifar.lr_find``)."""
        return self.path / "lr_find.json"

    @property
    def lr_find_png(self) -> Path:
        """The LR range test's plot."""
        return self.path / "lr_find.png"

    @property
    def report_json(self) -> Path:
        """The report's numbers, written last of a report."""
        return self.path / "report.json"

    def figure(self, name: str) -> Path:
        """A report picture, ``NAME.png`` (``curves``, ``lr``, ``misclassified``, ``gradcam``, ``confusion``, ...)."""
        return self.path / f"{name}.png"

    def has_checkpoint(self) -> bool:
        """True when the workdir holds at least one committed checkpoint."""
        return bool(committed_steps(self.checkpoints))

    def read_meta(self) -> dict[str, Any] | None:
        """Returns the metadata (epoch, step, history, best) of the newest committed checkpoint whose metadata
        is readable, without reading the state; None when there is none."""
        for step in reversed(committed_steps(self.checkpoints)):
            meta = checkpoint_meta(self.checkpoints / str(step))
            if meta is not None:
                return meta
        return None

    def saved_epochs(self) -> int:
        """Returns the newest epoch with a committed, readable checkpoint (0 when none)."""
        meta = self.read_meta()
        return 0 if meta is None else int(meta["epoch"])

    def saved_config(self) -> Config:
        """Returns the Config in ``config.json``; CheckpointError when it is absent or unreadable."""
        if not self.config_json.is_file():
            raise CheckpointError(f"{self.path} holds no config.json; cannot tell what run made it")
        try:
            return Config.load(self.config_json)
        except JaxcifarError as e:
            raise CheckpointError(f"unreadable config: {e}") from None

    def read_history(self) -> list[dict[str, Any]]:
        """Returns the per-epoch records of ``history.json`` ([] when there is none); RunFileError naming the
        file when it is not a JSON list of records."""
        path = self.history_json
        if not path.exists():
            return []
        history = read_json(path)
        if not isinstance(history, list) or not all(isinstance(r, dict) and "epoch" in r for r in history):
            raise RunFileError(f"{path} is not a list of epoch records; was it edited?")
        return history

    def report_written(self) -> bool:
        """True when ``report.json`` (written last of a report) is the report of the checkpoint a report reads
        now: the newest in ``best/`` (else in ``checkpoints/``)."""
        steps = committed_steps(self.best) or committed_steps(self.checkpoints)
        try:
            step = json.loads(self.report_json.read_text())["checkpoint"]["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return bool(steps) and step == steps[-1]
