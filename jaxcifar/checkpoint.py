"""orbax checkpoints of a run (latest N and best), with run metadata beside the state.

Where they live in the workdir (``checkpoints/<step>/``, ``best/<step>/``, ``config.json``, ...) is
``layout.RunDir``; docs/workdir.md lists every file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxcifar.config import Config, flag
from jaxcifar.errors import CheckpointError, ConfigError
from jaxcifar.layout import RunDir, committed_steps
from jaxcifar.state import TrainState, checkpoint_items

log = logging.getLogger(__name__)

# Fields a resumed run may change: they do not change what is trained (the trajectory of the
# weights), only how it is run, logged or where files are. Every other field must equal the saved one.
RESUME_FREE_FIELDS = (
    "resume",
    "workdir",
    "data_dir",
    "download",
    "log_every",
    "keep_checkpoints",
    "report",
    "eval_batch_size",
    "num_devices",
    "distributed",
    "lr_find_start",
    "lr_find_end",
    "lr_find_steps",
    "conv_impl",  # speed only: a run started on a CPU may go on on a GPU
    "compile_cache",
    "folder_cache",
    "async_checkpoints",
)


def resume_config(workdir: str | Path, config: Config) -> Config:
    """Returns the config to resume ``workdir`` with: ``config``, with ``lr`` from the saved config
    when ``config.lr`` is ``auto`` (the LR range test ran when the run started).

    Raises ConfigError listing every field outside ``RESUME_FREE_FIELDS`` whose value differs from the
    saved config (``--flag SAVED (saved) vs NOW (now)``): resuming would silently make another run.
    """
    saved = RunDir(workdir).saved_config()
    if config.lr == "auto":
        config = config.replace(lr=saved.lr)
    diffs = [
        f"{flag(name)} {_show(getattr(saved, name))} (saved) vs {_show(getattr(config, name))} (now)"
        for name in saved.to_dict()
        if name not in RESUME_FREE_FIELDS and getattr(saved, name) != getattr(config, name)
    ]
    if diffs:
        hint = (
            "; a finished run cannot be extended (the schedule depends on --epochs): start a new run in another "
            "--workdir"
            if any(d.startswith("--epochs ") for d in diffs)
            else ""
        )
        raise ConfigError(
            f"--resume {workdir}: the saved run differs in {'; '.join(diffs)}. Resume with the saved values "
            f"(python -m jaxcifar.train --config {RunDir(workdir).config_json} --resume) or use another "
            f"--workdir{hint}"
        )
    return config


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


class Checkpointer:
    """Saves and restores ``TrainState`` + JSON metadata with two orbax managers (latest, best).

    With ``asynchronous`` (the default) ``save`` returns once the arrays are copied, and orbax writes
    them in the background; ``wait`` (called before the next save and by ``close``) returns once the
    pending save is committed on disk, so a caller that writes its history after ``wait`` never lists
    an epoch without a checkpoint. Otherwise ``save`` returns committed. A failed write raises
    CheckpointError naming the folder and the OS error (from ``save``, or from the ``wait`` after it).
    """

    def __init__(self, workdir: str | Path, keep: int = 2, asynchronous: bool = True):
        workdir = Path(workdir).absolute()
        self.workdir = workdir
        self.rundir = RunDir(workdir)
        self.unreadable: list[int] = []
        self.asynchronous = asynchronous
        self.pending: int | None = None  # the step being written in the background
        self.failed: CheckpointError | None = None  # a background write that failed: every later wait raises it
        drop_closed_loop_callbacks()
        self.latest = _manager(self.rundir.checkpoints, keep, asynchronous)
        self.best = _manager(self.rundir.best, 1, asynchronous)

    def save(self, state: TrainState, meta: dict[str, Any], is_best: bool) -> None:
        """Saves the state as the latest checkpoint, and as best when ``is_best``: returns once committed,
        or (``asynchronous``) once the arrays are copied and the write is under way (first waiting for the
        previous save)."""
        self.wait()
        step = int(state.step)
        items = checkpoint_items(state)
        if self.asynchronous:  # the train step donates the state's buffers: write from a copy of them
            items = jax.tree.map(jnp.copy, items)
        args = ocp.args.Composite(state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta))
        managers = [self.latest, self.best] if is_best else [self.latest]
        # Refuse before writing when the disk clearly has no room: orbax's failure on a full disk leaves
        # stray tracebacks from its writer threads behind.
        needed = len(managers) * (sum(x.nbytes for x in jax.tree.leaves(items)) + len(json.dumps(meta)) + 2**16)
        free = shutil.disk_usage(self.workdir).free
        if free < needed:
            raise CheckpointError(
                f"cannot save checkpoint {self.latest.directory}/{step}: No space left on device (it needs about "
                f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free)"
            )
        for manager in managers:
            try:
                if step in manager.all_steps():  # a copy of this step from before a resume re-did it
                    manager.delete(step)
                manager.save(step, args=args, force=True)
            except Exception as e:  # orbax/tensorstore wrap OS errors (full disk, permissions) in many types
                raise CheckpointError(f"cannot save checkpoint {manager.directory}/{step}: {_first_line(e)}") from None
        self.pending = step
        if not self.asynchronous:
            self.wait()

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """Returns (state, meta) of the newest intact checkpoint, or None when there is none.

        A checkpoint that cannot be read (truncated or corrupt files) is skipped with a warning naming
        it, and the next older one is tried; CheckpointError when none of them can be read.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpoint_items(template))
        found = _restore_newest(self.latest, abstract, self.unreadable)
        if found is None:
            return None
        items, meta = found
        return template.replace(**items), meta

    def set_aside_unreadable(self) -> None:
        """Moves the checkpoints ``restore_latest`` could not read to ``WORKDIR/unreadable-checkpoints/``
        (kept for inspection; the resumed run writes those steps anew)."""
        if not self.unreadable:
            return
        aside = self.rundir.unreadable_checkpoints
        aside.mkdir(exist_ok=True)
        for step in self.unreadable:
            target = aside / f"{step}-{int(time.time())}"
            os.replace(self.rundir.checkpoints / str(step), target)
            print(f"moved the unreadable checkpoint {self.rundir.checkpoints / str(step)} to {target}", flush=True)
        self.latest.reload()
        self.unreadable = []

    def wait(self) -> None:
        """Returns once the pending save (if any) is committed on disk; CheckpointError if it failed, then
        and on every later call (orbax reports a background write's error once: a caller that waits again,
        e.g. to write its history at the end, must not take the failed save for committed)."""
        if self.failed is None:
            for manager in (self.latest, self.best):  # both, even when the first fails
                try:
                    manager.wait_until_finished()
                except Exception as e:  # the background write's error surfaces here
                    self.failed = self.failed or CheckpointError(
                        f"cannot save checkpoint {manager.directory}/{self.pending}: {_first_line(e)}"
                    )
            self.pending = None
        if self.failed is not None:
            raise self.failed

    def close(self) -> None:
        """Finishes pending saves and releases the managers (CheckpointError, after releasing them, when a save
        failed).

        A failed background write can surface again, or only, in a manager's ``close``: orbax's metadata store
        keeps its own future, whose error ``wait_until_finished`` may not have consumed yet. Such an error
        becomes (or stays) the one CheckpointError, never a raw ``OSError`` that hides it."""
        try:
            self.wait()
        finally:
            for manager in (self.latest, self.best):  # both, even when the first fails
                try:
                    manager.close()
                except Exception as e:
                    self.failed = self.failed or CheckpointError(
                        f"cannot save checkpoint {manager.directory}: {_first_line(e)}"
                    )
        if self.failed is not None:
            raise self.failed


def is_closed_loop_callback(error: BaseException | None) -> bool:
    """True for the ``RuntimeError: Event loop is closed`` of a callback scheduled from another thread
    (``call_soon_threadsafe``) into an asyncio loop that has been closed.

    orbax writes through tensorstore, whose C++ threads call back into orbax's event loop when each write
    completes; after a failed write (a full disk, ``ulimit -f``, a deleted workdir) orbax closes that loop,
    and every callback still to come raises this inside tensorstore, which reports it to
    ``sys.unraisablehook``: hundreds of tracebacks for one failure that ``Checkpointer`` reports in one line.
    """
    if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
        return False
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def drop_closed_loop_callbacks() -> None:
    """Makes ``sys.unraisablehook`` drop the errors of ``is_closed_loop_callback`` (idempotent); passes every
    other one to the hook that was there before."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        if not is_closed_loop_callback(unraisable.exc_value):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _manager(directory: Path, keep: int | None, asynchronous: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous)
    try:
        return ocp.CheckpointManager(directory, options=options)
    except OSError as e:
        raise CheckpointError(f"cannot use {directory}: {e.strerror or e}") from None


def _first_line(error: BaseException) -> str:
    """Returns the gist of an orbax/tensorstore error: the OS error where one is named (they bury it at
    the end of a long message), else the start of its first line."""
    text = str(error)
    code = re.search(r"os_error_code='?(\d+)", text) or re.search(r"\[Errno (\d+)\]", text)
    if code:
        return os.strerror(int(code.group(1)))
    lines = text.strip().splitlines()
    return f"{error.__class__.__name__}: {lines[0][:200] if lines else ''}"


def _restore_newest(
    manager: ocp.CheckpointManager,
    abstract: dict[str, Any],
    unreadable: list[int] | None = None,
    partial: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Returns (items, meta) of the newest checkpoint that can be read, items shaped as ``abstract``
    (``jax.ShapeDtypeStruct`` leaves; with ``partial``, a subset of the saved items, e.g. the weights
    without the optimizer state); None when there is no checkpoint. Appends the steps that could not
    be read to ``unreadable``."""
    steps = sorted(manager.all_steps())
    if not steps:
        return None
    if partial:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        state_args = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
    else:
        state_args = ocp.args.StandardRestore(abstract)
    args = ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
    broken = []
    for step in reversed(steps):
        try:
            restored = manager.restore(step, args=args)
        except Exception as e:  # a truncated/corrupt file surfaces as many exception types
            broken.append(f"{manager.directory}/{step} ({_first_line(e)})")
            if unreadable is not None:
                unreadable.append(step)
            continue
        if broken:
            print(f"warning: unreadable checkpoint {'; '.join(broken)}; using {manager.directory}/{step}", flush=True)
        return dict(restored["state"]), dict(restored["meta"])
    raise CheckpointError(f"no readable checkpoint: {'; '.join(broken)}")


def load_variables(
    workdir: str | Path, model: nn.Module, ema: bool = False, image_shape: tuple[int, int, int] = (32, 32, 3)
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns ``({"params", "batch_stats"}, meta)`` of the workdir's best checkpoint (falling back to the
    newest intact one) for ``model.apply``, reading only the weights (no optimizer state, no optimizer
    needed); with ``ema`` the EMA weights the run kept (``--ema-decay``). Raises CheckpointError when no
    checkpoint can be read, or when they do not fit ``model`` (another architecture or width)."""
    workdir = Path(workdir).absolute()
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False, mutable=_WEIGHTS)
    )
    names = ("ema_params", "ema_batch_stats") if ema else _WEIGHTS
    abstract = {name: shapes[kind] for name, kind in zip(names, _WEIGHTS, strict=True)}
    errors = []
    for folder in (RunDir(workdir).best, RunDir(workdir).checkpoints):
        if not committed_steps(folder):
            continue
        manager = _read_only_manager(folder)
        try:
            found = _restore_newest(manager, abstract, partial=True)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        finally:
            manager.close()
        if found is not None:
            items, meta = found
            return {kind: items[name] for name, kind in zip(names, _WEIGHTS, strict=True)}, meta
    raise CheckpointError(f"{workdir}: {'; '.join(errors) or 'no checkpoint found'}")


_WEIGHTS = ("params", "batch_stats")
_READ_ONLY_NOTICE = "Given directory is read only"  # orbax logs it (absl, WARNING) for every read-only manager


def _read_only_manager(folder: Path) -> ocp.CheckpointManager:
    """Returns an orbax CheckpointManager that only reads ``folder``, quietly: its options already say what
    ``read_only`` implies (orbax warns for each one it has to change), and orbax's notice that the folder
    is read only, which every such manager logs, is dropped."""
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    absl_logger = logging.getLogger("absl")

    def not_the_notice(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_READ_ONLY_NOTICE)

    absl_logger.addFilter(not_the_notice)
    try:
        return ocp.CheckpointManager(folder, options=options)
    finally:
        absl_logger.removeFilter(not_the_notice)
