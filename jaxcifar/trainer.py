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

import models
from jaxcifar import optim, parallel, steps
from jaxcifar.checkpoint import Checkpointer, check_resumable, has_checkpoint
from jaxcifar.config import Config
from jaxcifar.data import Dataset, Split, load_dataset
from jaxcifar.errors import CheckpointError, JaxcifarError
from jaxcifar.mixing import MixSpec
from jaxcifar.state import TrainState, create_train_state, param_count
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
        writer.tb.add_image(f"report/{name}", figure_to_array(figure), epoch, dataformats="HWC")
    writer.tb.flush()
    summary = report.summary
    _echo(
        f"report: {summary['split']} accuracy {100 * summary['accuracy']:.2f}% (best checkpoint), "
        f"{', '.join(p.name for p in report.paths.values())} in {config.workdir}",
        verbose,
    )


def _resolve_auto_lr(config: Config, dataset: Dataset, verbose: bool) -> Config:
    """Returns ``config`` with ``lr`` set: from the workdir's saved config when resuming, else from
    the LR range test (``jaxcifar.lr_find``), whose files go to the workdir."""
    saved = Path(config.workdir) / "config.json"
    if config.resume and has_checkpoint(config.workdir) and saved.exists():
        lr = Config.load(saved).lr
        _echo(f"lr: {lr:.3g} (found by the LR range test when this run started)", verbose)
        return config.replace(lr=lr)
    from jaxcifar.lr_find import lr_find

    found = lr_find(config, dataset, out_dir=config.workdir, verbose=verbose)
    _echo(f"lr: {found.suggestion:.3g} from the LR range test ({found.rule}), see lr_find.png", verbose)
    return config.replace(lr=found.suggestion)


def fit(config: Config, dataset: Dataset | None = None, *, verbose: bool = True) -> FitResult:
    """Trains ``config.model`` as configured and returns ``FitResult(state, history)``.

    Writes ``config.json``, ``history.json``, checkpoints and TensorBoard events to
    ``config.workdir``. With ``config.resume`` it continues from the latest checkpoint (same
    result as an uninterrupted run). ``dataset`` overrides loading from ``config``'s source.
    Raises ``JaxcifarError`` subclasses on user errors, before anything in the workdir changes.
    """
    workdir = Path(config.workdir)
    existing = has_checkpoint(workdir)
    if existing and not config.resume:
        raise CheckpointError(
            f"--workdir {workdir} already holds a run; pass --resume to continue it or choose another --workdir"
        )
    if existing:
        check_resumable(workdir, config)

    if config.distributed:
        parallel.initialize_distributed()
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_divisible(config.batch_size, mesh, "--batch-size")
    parallel.check_divisible(config.eval_batch_size, mesh, "--eval-batch-size")
    _echo(parallel.describe(mesh), verbose)
    if dataset is None:
        dataset = load_dataset(config)
    if dataset.num_classes != config.num_classes:
        raise JaxcifarError(
            f"dataset has {dataset.num_classes} classes, --dataset {config.dataset} needs {config.num_classes}"
        )
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

    steps_per_epoch = len(train) // config.batch_size
    if config.lr == "auto":
        config = _resolve_auto_lr(config, dataset, verbose)
    tx, schedule = optim.make_training_optimizer(config, steps_per_epoch)
    model = build_model(config)
    use_ema = config.ema_decay is not None
    state = jax.device_put(create_train_state(model, tx, config.seed, ema=use_ema), on_all)
    _echo(
        f"model: {config.model} width {config.width}, {param_count(state.params):,} parameters, {config.dtype}", verbose
    )

    workdir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    history: list[dict[str, Any]] = []
    best = -1.0
    if config.resume:
        restored = checkpointer.restore_latest(state)
        if restored is None:
            _echo(f"resume: no checkpoint in {workdir}, starting from scratch", verbose)
        else:
            state, meta = jax.device_put(restored[0], on_all), restored[1]
            history, best = list(meta["history"]), float(meta["best"])
            _echo(f"resume: epoch {len(history)} (step {int(state.step)}) from {workdir}", verbose)
    is_main = jax.process_index() == 0  # only one host writes files
    if is_main:
        config.save(workdir / "config.json")
    writer = MetricWriter(workdir, history, enabled=is_main)

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
            record["lr"] = float(schedule(int(state.step) - 1))
            record["train_seconds"] = train_done - start
            record["eval_seconds"] = time.perf_counter() - train_done
            record["seconds"] = time.perf_counter() - start
            if config.tta != "none":
                record["tta"] = config.tta
            if mix.enabled:
                record["train_acc_of"] = "dominant label"
            writer.write_epoch(record)
            prefix = "ema_" if use_ema else ""
            selection = record.get(f"{prefix}val_acc", record[f"{prefix}test_acc"])
            is_best = selection > best
            best = max(best, selection)
            meta = {"epoch": epoch, "step": int(state.step), "history": writer.history, "best": best}
            checkpointer.save(state, meta, is_best)
            _echo(_summary_line(record, config.epochs), verbose)
        if config.report and is_main:
            checkpointer.wait()
            _write_report(config, dataset, writer, verbose)
    finally:
        checkpointer.close()
        writer.close()
    return FitResult(state, writer.history)
