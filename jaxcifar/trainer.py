"""The training loop: ``fit(config)``.

The whole dataset lives on the device as uint8; each epoch draws a permutation on the device,
slices fixed-size batches from it (the last partial batch is dropped) and runs the jitted,
AOT-compiled train step, so nothing recompiles inside a run. After each epoch the model is
evaluated on the validation split (if any) and the test split, the record goes to
``history.json`` and TensorBoard, and orbax checkpoints the state (latest N, and best).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcifar import models, optim, parallel, sizing, steps
from jaxcifar.checkpoint import Checkpointer, has_checkpoint, read_meta, resume_config
from jaxcifar.config import Config
from jaxcifar.data import Dataset, Split, load_dataset
from jaxcifar.errors import CheckpointError, ConfigError, DataError, DivergedError
from jaxcifar.files import ensure_dir
from jaxcifar.mixing import MixSpec
from jaxcifar.state import TrainState, create_train_state, param_count
from jaxcifar.workdir import WorkdirLock, check_not_in_use, check_workdir, saved_epochs
from jaxcifar.writers import MetricWriter

log = logging.getLogger(__name__)

# tqdm disables itself with disable=None when its stream is no terminal (CI logs); notebook
# widgets report no terminal either, so there the bar is forced on.
_BAR_DISABLE = False if any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__) else None


class FitResult(NamedTuple):
    """What ``fit`` returns: the final ``TrainState`` and the per-epoch history (list of dicts)."""

    state: TrainState
    history: list[dict[str, Any]]


class DeviceSplit(NamedTuple):
    """A split on the device: uint8 images (N, 32, 32, 3), int32 labels (N,)."""

    images: jax.Array
    labels: jax.Array

    @classmethod
    def put(cls, split: Split, sharding: Any = None) -> DeviceSplit:
        """Copies a host split to the device(s): the default device, or ``sharding`` (e.g. replicated)."""
        return cls(jax.device_put(split.images, sharding), jax.device_put(split.labels, sharding))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def build_model(config: Config) -> Any:
    """Returns the Linen model of ``config``."""
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    return models.get_model(config.model, num_classes=config.num_classes, width=config.width, dtype=dtype)


def eval_index_rows(n: int, batch_size: int) -> jax.Array:
    """Returns int32 (ceil(n / batch_size), batch_size) indices 0..n-1 padded with -1 (masked)."""
    rows = np.arange(math.ceil(n / batch_size) * batch_size, dtype=np.int32)
    rows[rows >= n] = -1
    return jax.device_put(rows.reshape(-1, batch_size))


def shuffled_index_rows(key: jax.Array, n: int, steps_per_epoch: int, batch_size: int) -> jax.Array:
    """Returns int32 (steps_per_epoch, batch_size): a permutation of 0..n-1 without the remainder."""
    return _shuffled_rows(key, n, steps_per_epoch, batch_size)


@jax.jit(static_argnums=(1, 2, 3))
def _shuffled_rows(key: jax.Array, n: int, steps_per_epoch: int, batch_size: int) -> jax.Array:
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    return perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)


def evaluate(
    state: TrainState,
    split: DeviceSplit,
    eval_step: Any,
    batch_size: int,
    index_rows: jax.Array | None = None,
    gather: Any = steps.gather_batch,
) -> dict[str, float]:
    """Returns ``{"loss", "acc"}`` of ``state`` over the whole split (padded last batch masked).

    ``eval_step`` comes from ``steps.make_eval_step``; ``gather`` slices batches on the device.
    """
    rows = eval_index_rows(len(split), batch_size) if index_rows is None else index_rows
    totals = None
    for i in range(rows.shape[0]):
        metrics = eval_step(state, gather(split.images, split.labels, rows, i))
        totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    totals = jax.device_get(totals)
    return {"loss": float(totals["loss_sum"] / totals["count"]), "acc": float(totals["correct"] / totals["count"])}


def _echo(message: str, verbose: bool) -> None:
    if verbose:
        tqdm.write(message, file=sys.stdout)


def _summary_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}"]
    for split in ("train", "val", "test", "ema_val", "ema_test"):
        if f"{split}_loss" in record:
            parts.append(f"{split} loss {record[f'{split}_loss']:.4f} acc {100 * record[f'{split}_acc']:6.2f}%")
    parts.append(f"lr {record['lr']:.3e}")
    parts.append(f"{record['seconds']:6.1f}s")
    return " | ".join(parts)


def _write_report(config: Config, dataset: Dataset, writer: MetricWriter, verbose: bool) -> None:
    """Runs ``jaxcifar.report.make_report`` on the finished run and logs its figures to TensorBoard."""
    from jaxcifar.plots import figure_to_array
    from jaxcifar.report import make_report

    report = make_report(config.workdir, dataset=dataset, config=config, tta=config.tta)
    epoch = len(writer.history)
    for name, figure in report.figures.items():
        writer.write_image(f"report/{name}", figure_to_array(figure), epoch)
    summary = report.summary
    _echo(
        f"report: {summary['split']} accuracy {100 * summary['accuracy']:.2f}% (best checkpoint), "
        f"{', '.join(p.name for p in report.paths.values())} in {config.workdir}",
        verbose,
    )


def _resolve_auto_lr(config: Config, dataset: Dataset, verbose: bool) -> Config:
    """Returns ``config`` with ``lr`` set by the LR range test (``jaxcifar.lr_find``), whose files go
    to the workdir."""
    from jaxcifar.lr_find import lr_find

    found = lr_find(config, dataset, out_dir=config.workdir, verbose=verbose)
    _echo(f"lr: {found.suggestion:.3g} from the LR range test ({found.rule}), see lr_find.png", verbose)
    return config.replace(lr=found.suggestion)


def _check_resume(config: Config, workdir: Path, verbose: bool) -> tuple[Config, dict[str, Any] | None]:
    """Returns (the config to run, the newest checkpoint's metadata, or None for a fresh run).

    Raises CheckpointError when the workdir holds a run and ``--resume`` is not given, or a live run
    holds it; ConfigError when the saved run differs in a field that changes training
    (``checkpoint.resume_config``)."""
    check_not_in_use(workdir)
    if not has_checkpoint(workdir):
        if config.resume:
            _echo(f"resume: no checkpoint in {workdir}, starting from scratch", verbose)
        return config, None
    if not config.resume:
        raise CheckpointError(
            f"--workdir {workdir} already holds a run; pass --resume to continue it or choose another --workdir"
        )
    config = resume_config(workdir, config)
    meta = read_meta(workdir)
    if meta is None:
        raise CheckpointError(f"{workdir}/checkpoints: no checkpoint with readable metadata")
    return config, meta


class Restored(NamedTuple):
    """Where a resumed run stands: its newest intact checkpoint, and the newer ones that were unreadable."""

    state: TrainState
    history: list[dict[str, Any]]
    best: float
    steps_per_epoch: int
    unreadable: list[int]


def _restore(config: Config, model: Any, meta: dict[str, Any], mesh: Any, workdir: Path) -> Restored:
    """Returns the newest intact checkpoint of ``workdir`` (an unreadable newer one is named and skipped)."""
    steps_per_epoch = int(meta["step"]) // int(meta["epoch"])
    tx, _ = optim.make_training_optimizer(config, steps_per_epoch)
    template = create_train_state(model, tx, config.seed, ema=config.ema_decay is not None)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        restored = checkpointer.restore_latest(template)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"{workdir}/checkpoints: no checkpoint to resume")
    state, meta = restored
    state = jax.device_put(state, parallel.replicated(mesh))
    return Restored(state, list(meta["history"]), float(meta["best"]), steps_per_epoch, checkpointer.unreadable)


# A mean cross-entropy above this many times the loss of a uniform guess (ln K nats) means the true
# class gets a probability below K^-100: the run has diverged even if the loss is still finite.
DIVERGED_LOSS_FACTOR = 100.0


def _check_finite(what: str, loss: float, num_classes: int, epoch: int, step: int, workdir: Path) -> None:
    """Raises DivergedError when ``loss`` is nan/inf or beyond ``DIVERGED_LOSS_FACTOR * ln(num_classes)``."""
    if math.isfinite(loss) and loss <= DIVERGED_LOSS_FACTOR * math.log(num_classes):
        return
    epoch_saved = saved_epochs(workdir)
    last = (
        f"the last good checkpoint is epoch {epoch_saved} in {workdir / 'checkpoints'}"
        if epoch_saved
        else "no epoch was saved"
    )
    raise DivergedError(
        f"training diverged: {what} is {loss:.4g} at epoch {epoch}, step {step}; stopped, {last}. Start a new run "
        "with a lower --lr (or --grad-clip)"
    )


def fit(config: Config, dataset: Dataset | None = None, *, verbose: bool = True) -> FitResult:
    """Trains ``config.model`` as configured and returns ``FitResult(state, history)``.

    Writes ``config.json``, ``history.json``, checkpoints and TensorBoard events to
    ``config.workdir``, holding its lock (``workdir.WorkdirLock``) while it runs. With
    ``config.resume`` it continues from the newest intact checkpoint (same result as an
    uninterrupted run); every field that changes training must equal the saved config, and a
    finished run is returned as it is. ``dataset`` overrides loading from ``config``'s source.
    Each epoch's checkpoint is committed before ``history.json`` lists the epoch. Raises
    ``JaxcifarError`` subclasses on user errors (before anything in the workdir changes), and
    ``DivergedError`` when the loss becomes non-finite (the diverged epoch is not saved).
    """
    workdir = check_workdir(config.workdir)
    config, meta = _check_resume(config, workdir, verbose)
    if config.distributed:
        parallel.initialize_distributed()
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_divisible(config.batch_size, mesh, "--batch-size")
    parallel.check_divisible(config.eval_batch_size, mesh, "--eval-batch-size")
    model = build_model(config)
    sizing.check_fits(config, model, list(mesh.devices.flat))
    restored = None
    if meta is not None:
        restored = _restore(config, model, meta, mesh, workdir)
        state, history = restored.state, restored.history
        if len(history) >= config.epochs:
            _echo(
                f"already finished: {len(history)}/{config.epochs} epochs in {workdir}; nothing to do (a longer run "
                f"is a new run in another --workdir; python -m jaxcifar.report --workdir {workdir} writes the report)",
                verbose,
            )
            return FitResult(state, history)

    _echo(parallel.describe(mesh), verbose)
    if dataset is None:
        dataset = load_dataset(config)
    if dataset.num_classes != config.num_classes:
        raise ConfigError(
            f"dataset has {dataset.num_classes} classes, --dataset {config.dataset} needs {config.num_classes}"
        )
    steps_per_epoch = len(dataset.train) // config.batch_size
    if restored is not None and restored.steps_per_epoch != steps_per_epoch:
        raise DataError(
            f"--resume {workdir}: the run made {restored.steps_per_epoch} steps per epoch, this data gives "
            f"{steps_per_epoch} ({len(dataset.train)} training images): is --data-dir the data the run started with?"
        )
    if config.lr == "auto":
        config = _resolve_auto_lr(config, dataset, verbose)
    tx, schedule = optim.make_training_optimizer(config, steps_per_epoch)
    if restored is None:
        state = create_train_state(model, tx, config.seed, ema=config.ema_decay is not None)
        state, history, best = jax.device_put(state, parallel.replicated(mesh)), [], -1.0
    else:
        state, history, best = restored.state, restored.history, restored.best
        _echo(f"resume: epoch {len(history)} (step {int(state.step)}) from {workdir}", verbose)

    is_main = jax.process_index() == 0  # only one host writes files
    ensure_dir(workdir, "--workdir")
    lock = WorkdirLock(workdir) if is_main else None
    if lock is not None:
        lock.acquire()
    try:
        if is_main and restored is None:
            config.save(workdir / "config.json")
        unreadable = restored.unreadable if restored is not None else []
        return _train(config, dataset, state, history, best, unreadable, schedule, mesh, workdir, is_main, verbose)
    finally:
        if lock is not None:
            lock.release()


def _train(
    config: Config,
    dataset: Dataset,
    state: TrainState,
    history: list[dict[str, Any]],
    best: float,
    unreadable: list[int],
    schedule: Any,
    mesh: Any,
    workdir: Path,
    is_main: bool,
    verbose: bool,
) -> FitResult:
    """The run proper, under the workdir's lock: compile, the epochs from ``len(history) + 1``, the report.

    ``state``, ``history`` and ``best`` are where the run stands (fresh, or restored); the ``unreadable``
    checkpoint steps found by the restore are moved aside first."""
    on_all = parallel.replicated(mesh)
    train = DeviceSplit.put(dataset.train, on_all)
    evals = {"test": DeviceSplit.put(dataset.test, on_all)}
    if dataset.val is not None:
        evals = {"val": DeviceSplit.put(dataset.val, on_all), **evals}
    _echo(
        f"data: train {len(train)}, {'val ' + str(len(dataset.val)) + ', ' if dataset.val else ''}test "
        f"{len(dataset.test)} images, {dataset.num_classes} classes",
        verbose,
    )
    _echo(
        f"model: {config.model} width {config.width}, {param_count(state.params):,} parameters, {config.dtype}", verbose
    )
    steps_per_epoch = len(train) // config.batch_size
    use_ema = config.ema_decay is not None
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    if is_main:
        checkpointer.unreadable = list(unreadable)
        checkpointer.set_aside_unreadable()
    writer = MetricWriter(workdir, history, enabled=is_main)
    writer.write_history()  # matches the checkpoint resumed from (an older one when the newest was broken)

    mix = MixSpec(
        config.mixup_alpha,
        config.cutmix_alpha,
        config.mix_prob,
        (config.epochs - config.mix_off_epoch) * steps_per_epoch,
    )
    train_step = steps.make_train_step(
        dataset.mean,
        dataset.std,
        config.augment,
        config.cutout_size,
        config.label_smoothing,
        mesh=mesh,
        mix=mix,
        ema_decay=config.ema_decay,
    )
    eval_steps = {"": steps.make_eval_step(dataset.mean, dataset.std, mesh=mesh, tta=config.tta)}
    if use_ema:
        eval_steps["ema_"] = steps.make_eval_step(dataset.mean, dataset.std, mesh=mesh, tta=config.tta, ema=True)
    gather = steps.make_gather_batch(mesh)
    eval_rows = {name: eval_index_rows(len(split), config.eval_batch_size) for name, split in evals.items()}
    shuffle_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xDA7A)

    t0 = time.perf_counter()
    example = gather(
        train.images, train.labels, shuffled_index_rows(shuffle_key, len(train), steps_per_epoch, config.batch_size), 0
    )
    train_step = train_step.lower(state, example).compile()
    eval_example = gather(evals["test"].images, evals["test"].labels, eval_rows["test"], 0)
    eval_steps = {prefix: fn.lower(state, eval_example).compile() for prefix, fn in eval_steps.items()}
    _echo(f"compile: {time.perf_counter() - t0:.1f}s (train and eval steps, once per run)", verbose)

    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            start = time.perf_counter()
            rows = shuffled_index_rows(
                jax.random.fold_in(shuffle_key, epoch), len(train), steps_per_epoch, config.batch_size
            )
            sums = None
            bar = tqdm(
                total=steps_per_epoch,
                desc=f"epoch {epoch}/{config.epochs}",
                unit="step",
                leave=False,
                disable=_BAR_DISABLE if verbose else True,
                dynamic_ncols=True,
            )
            for i in range(steps_per_epoch):
                state, metrics = train_step(state, gather(train.images, train.labels, rows, i))
                sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
                if (i + 1) % config.log_every == 0 or i + 1 == steps_per_epoch:
                    host = jax.device_get(sums)
                    loss, acc = host["loss_sum"] / host["count"], host["correct"] / host["count"]
                    if not math.isfinite(loss) or loss > DIVERGED_LOSS_FACTOR * math.log(dataset.num_classes):
                        bar.close()
                        _check_finite(
                            "the train loss", float(loss), dataset.num_classes, epoch, int(state.step), workdir
                        )
                    lr = float(schedule(int(state.step) - 1))
                    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * acc:.2f}%", lr=f"{lr:.2e}", refresh=False)
                    writer.write_scalar("loss/train_running", float(loss), int(state.step))
                bar.update(1)
            bar.close()
            host = jax.device_get(sums)
            train_done = time.perf_counter()
            record: dict[str, Any] = {
                "epoch": epoch,
                "step": int(state.step),
                "train_loss": float(host["loss_sum"] / host["count"]),
                "train_acc": float(host["correct"] / host["count"]),
            }
            for prefix, eval_step in eval_steps.items():
                for name, split in evals.items():
                    result = evaluate(state, split, eval_step, config.eval_batch_size, eval_rows[name], gather)
                    record[f"{prefix}{name}_loss"], record[f"{prefix}{name}_acc"] = result["loss"], result["acc"]
            _check_finite("the train loss", record["train_loss"], dataset.num_classes, epoch, record["step"], workdir)
            for key, value in record.items():  # eval losses: a non-finite one would make a non-finite "best"
                if key.endswith("_loss") and not math.isfinite(value):
                    _check_finite(
                        f"the {key.replace('_', ' ')}", value, dataset.num_classes, epoch, record["step"], workdir
                    )
            record["lr"] = float(schedule(int(state.step) - 1))
            record["train_seconds"] = train_done - start
            record["eval_seconds"] = time.perf_counter() - train_done
            record["seconds"] = time.perf_counter() - start
            if config.tta != "none":
                record["tta"] = config.tta
            if mix.enabled:
                record["train_acc_of"] = "dominant label"
            prefix = "ema_" if use_ema else ""
            selection = record.get(f"{prefix}val_acc", record[f"{prefix}test_acc"])
            is_best = selection > best
            best = max(best, selection)
            meta = {"epoch": epoch, "step": int(state.step), "history": [*writer.history, record], "best": best}
            checkpointer.save(state, meta, is_best)  # committed before history.json lists the epoch
            writer.write_epoch(record)
            _echo(_summary_line(record, config.epochs), verbose)
        if config.report and is_main:
            _write_report(config, dataset, writer, verbose)
    finally:
        checkpointer.close()
        writer.close()
    return FitResult(state, writer.history)
