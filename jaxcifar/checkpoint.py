"""Workdir layout and orbax checkpoints (latest N and best), with run metadata beside the state.

Layout of a workdir::

    config.json         the run's Config
    history.json        one dict per finished epoch
    checkpoints/<step>/ the latest ``keep_checkpoints`` states (+ metadata: epoch, history, best)
    best/<step>/        the state with the best selection accuracy so far
    tensorboard/        event files
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxcifar.config import Config
from jaxcifar.errors import CheckpointError, ConfigError
from jaxcifar.state import TrainState, checkpoint_items

# Fields that change the shapes of the state: a workdir can only be resumed when they agree.
MODEL_FIELDS = ("model", "width", "dataset", "optimizer")


def write_json(path: Path, data: Any) -> None:
    """Writes JSON atomically (temp file then rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_history(workdir: str | Path) -> list[dict[str, Any]]:
    """Returns the per-epoch history of a workdir ([] when there is none)."""
    path = Path(workdir) / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def has_checkpoint(workdir: str | Path) -> bool:
    """True when the workdir holds at least one saved checkpoint."""
    directory = Path(workdir) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_resumable(workdir: Path, config: Config) -> None:
    """Raises CheckpointError when ``workdir`` was made by a run with another model/optimizer."""
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        raise CheckpointError(f"{workdir} holds checkpoints but no config.json; cannot tell what made them")
    try:
        saved = Config.load(saved_path)
    except (ConfigError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{saved_path}: unreadable config ({e})") from e
    diffs = [
        f"--{name.replace('_', '-')} {getattr(saved, name)} (workdir) vs {getattr(config, name)} (now)"
        for name in MODEL_FIELDS
        if getattr(saved, name) != getattr(config, name)
    ]
    if diffs:
        raise CheckpointError(f"cannot resume {workdir}: it was made by a different run: {'; '.join(diffs)}")


class Checkpointer:
    """Saves and restores ``TrainState`` + JSON metadata with two orbax managers (latest, best)."""

    def __init__(self, workdir: str | Path, keep: int = 2):
        workdir = Path(workdir).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.latest = ocp.CheckpointManager(workdir / "checkpoints", options=options)
        self.best = ocp.CheckpointManager(
            workdir / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        )

    def save(self, state: TrainState, meta: dict[str, Any], is_best: bool) -> None:
        """Saves the state (asynchronously) as the latest checkpoint, and as best when ``is_best``."""
        step = int(state.step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(checkpoint_items(state)), meta=ocp.args.JsonSave(meta))
        self.latest.save(step, args=args)
        if is_best:
            self.best.save(step, args=args)

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """Returns (state, meta) of the latest checkpoint, or None when there is none."""
        return _restore(self.latest, template)

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the managers."""
        self.wait()
        self.latest.close()
        self.best.close()


def _restore(manager: ocp.CheckpointManager, template: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpoint_items(template))
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {manager.directory}/{step} does not fit this model/optimizer "
            f"({e.__class__.__name__}: {str(e).splitlines()[0][:160]})"
        ) from e
    return template.replace(**restored["state"]), dict(restored["meta"])


def load_best(workdir: str | Path, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Returns (state, meta) of the workdir's best checkpoint (falls back to the latest)."""
    workdir = Path(workdir).absolute()
    for name in ("best", "checkpoints"):
        if (workdir / name).is_dir():
            manager = ocp.CheckpointManager(workdir / name)
            try:
                found = _restore(manager, template)
            finally:
                manager.close()
            if found is not None:
                return found
    raise CheckpointError(f"{workdir}: no checkpoint found")
