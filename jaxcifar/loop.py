"""The training loop: ``fit(config)`` trains one run and checkpoints every epoch.

The whole dataset lives on the device as uint8; each epoch draws a permutation on the device,
slices fixed-size batches from it (the last partial batch is dropped) and runs the jitted,
AOT-compiled train step, so nothing recompiles inside a run. After each epoch the model is
evaluated on the validation split (if any) and the test split, orbax commits the checkpoint
(latest N, and best), then the record goes to ``history.json`` and TensorBoard.

``fit`` reads as its steps: ``check_resume`` -> restore or start -> ``set_up`` (data on the device,
compiled steps) -> per epoch ``train_epoch``, ``evaluate_epoch``, ``select_and_save``. The LR range
test (``--lr auto``) and the report come around it, in ``jaxcifar.run``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from tqdm import TqdmWarning

with warnings.catch_warnings():
    # In a notebook without ipywidgets tqdm.auto warns, then falls back to the text bar: that fallback is fine.
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    from tqdm.auto import tqdm

from jaxcifar import backend, distributed, optim, sizing, steps, testhooks
from jaxcifar.augmentation import AugmentSpec
from jaxcifar.batches import DeviceSplit, make_gather_batch, shuffled_index_rows
from jaxcifar.checkpoint import Checkpointer, has_checkpoint, read_meta, resume_config
from jaxcifar.config import Config
from jaxcifar.data import Dataset, load_dataset
from jaxcifar.errors import CheckpointError, ConfigError, DataError, DivergedError
from jaxcifar.evaluation import Evaluator
from jaxcifar.files import ensure_dir
from jaxcifar.mesh import check_divisible, make_mesh, replicated
from jaxcifar.mesh import describe as describe_mesh
from jaxcifar.mixing import MixSpec
from jaxcifar.network import build_model, data_init
from jaxcifar.sources import default_cache_dir
from jaxcifar.state import TrainState, create_train_state, param_count
from jaxcifar.timing import Timing
from jaxcifar.workdir import claim_workdir, holding, saved_epochs
from jaxcifar.writers import MetricWriter

# tqdm disables itself with disable=None when its stream is no terminal (CI logs); notebook
# widgets report no terminal either, so there the bar is forced on.
_BAR_DISABLE = False if any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__) else None

# A mean cross-entropy above this many times the loss of a uniform guess (ln K nats) means the true
# class gets a probability below K^-100: the run has diverged even if the loss is still finite.
DIVERGED_LOSS_FACTOR = 100.0


class FitResult(NamedTuple):
    """What ``fit`` returns: the final ``TrainState`` and the per-epoch history (list of dicts)."""

    state: TrainState
    history: list[dict[str, Any]]


class Restored(NamedTuple):
    """Where a resumed run stands: its newest intact checkpoint, and the newer ones that were unreadable."""

    state: TrainState
    history: list[dict[str, Any]]
    best: float
    steps_per_epoch: int
    unreadable: list[int]


@dataclasses.dataclass
class Run:
    """Everything an epoch needs besides the state, built once per ``fit`` by ``set_up``."""

    config: Config
    workdir: Path
    num_classes: int
    train: DeviceSplit
    steps_per_epoch: int
    shuffle_key: jax.Array
    train_step: Callable[..., Any]
    gather: Callable[..., Any]
    evaluators: dict[str, Evaluator]  # history prefix ("test", "ema_val", ...) -> evaluator
    schedule: optax.Schedule
    writer: MetricWriter
    checkpointer: Checkpointer
    mix_enabled: bool
    verbose: bool
    timing: Timing


def echo(message: str, verbose: bool) -> None:
    """Prints one line above the progress bar when ``verbose``."""
    if verbose:
        tqdm.write(message, file=sys.stdout)


def check_resume(config: Config, workdir: Path, verbose: bool = True) -> tuple[Config, dict[str, Any] | None]:
    """Returns (the config to run, the newest checkpoint's metadata, or None for a fresh run).

    Raises CheckpointError when the workdir holds a run and ``--resume`` is not given; ConfigError when
    the saved run differs in a field that changes training (``checkpoint.resume_config``). Call it
    holding the workdir's lock (``workdir.holding``): the answer holds only while no other run can write
    the workdir."""
    if not has_checkpoint(workdir):
        if config.resume:
            echo(f"resume: no checkpoint in {workdir}, starting from scratch", verbose)
        return config, None
    if not config.resume:
        raise CheckpointError(
            f"--workdir {workdir} already holds a run; pass --resume (in Python: config.replace(resume=True)) "
            "to continue it or choose another --workdir"
        )
    config = resume_config(workdir, config)
    meta = read_meta(workdir)
    if meta is None:
        raise CheckpointError(f"{workdir}/checkpoints: no checkpoint with readable metadata")
    return config, meta


def restore(config: Config, model: Any, meta: dict[str, Any], mesh: Mesh, workdir: Path) -> Restored:
    """Returns the newest intact checkpoint of ``workdir`` (an unreadable newer one is named and skipped)."""
    steps_per_epoch = int(meta["step"]) // int(meta["epoch"])
    tx, _ = optim.make_training_optimizer(config, steps_per_epoch)
    template = create_train_state(
        model, tx, config.seed, ema=config.ema_decay is not None, lookahead=config.lookahead_every > 0
    )
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, asynchronous=False)
    try:
        restored = checkpointer.restore_latest(template)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"{workdir}/checkpoints: no checkpoint to resume")
    state, meta = restored
    if jax.process_count() > 1:  # arrays on this process's device cannot move to other hosts' devices: from host
        state = jax.device_get(state)
    state = jax.device_put(state, replicated(mesh))
    return Restored(state, list(meta["history"]), float(meta["best"]), steps_per_epoch, checkpointer.unreadable)


def fit(
    config: Config, dataset: Dataset | None = None, *, verbose: bool = True, timing: Timing | None = None
) -> FitResult:
    """Trains ``config.model`` as configured and returns ``FitResult(state, history)``.

    Writes ``config.json``, ``history.json``, checkpoints and TensorBoard events to
    ``config.workdir``, holding its lock (``workdir.holding``) from before it reads the workdir until it
    ends (already held when ``jaxcifar.run`` calls it). With
    ``config.resume`` it continues from the newest intact checkpoint (same result as an
    uninterrupted run); every field that changes training must equal the saved config, and a
    finished run is returned as it is. ``dataset`` overrides loading from ``config``'s source.
    ``config.lr`` must be a number (``jaxcifar.run`` resolves ``"auto"`` first). Raises
    ``JaxcifarError`` subclasses on user errors (before anything in the workdir changes), and
    ``DivergedError`` when the loss becomes non-finite (the diverged epoch is not saved). ``timing``
    collects the seconds of data loading, compiling, training, evaluation and checkpoint waits.
    """
    timing = timing or Timing()
    if config.distributed:  # first: what follows may be collective, and every process must run this config
        distributed.initialize(config)
    with holding(
        config.workdir, is_main=distributed.is_main_process(), every_process=distributed.every_process
    ) as workdir:  # before anything is read from the workdir or decided about it
        return _fit(config, workdir, dataset, verbose, timing)


def _fit(config: Config, workdir: Path, dataset: Dataset | None, verbose: bool, timing: Timing) -> FitResult:
    """``fit`` once the workdir's lock is held."""
    shown, verbose = verbose, verbose and distributed.is_main_process()  # other processes print their devices line
    config, meta = check_resume(config, workdir, verbose)
    if meta is None or int(meta["epoch"]) < config.epochs:
        claim_workdir(workdir)  # decided: this command trains in the workdir (a refused one names its pid)
    if config.compile_cache:
        backend.enable_compile_cache(default_cache_dir() / "xla")
    optim.peak_lr(config)  # a number: --lr auto is resolved by jaxcifar.run before fit
    with timing.phase("init"):
        mesh, model = mesh_and_model(config)
        restored = restore(config, model, meta, mesh, workdir) if meta is not None else None
    if restored is not None and len(restored.history) >= config.epochs:
        echo(
            f"already finished: {len(restored.history)}/{config.epochs} epochs in {workdir}; nothing to do (a longer "
            f"run is a new run in another --workdir; python -m jaxcifar.report --workdir {workdir} writes the report)",
            verbose,
        )
        return FitResult(restored.state, restored.history)
    echo(describe_mesh(mesh), shown)
    with timing.phase("data"):
        dataset = checked_dataset(config, dataset, restored)
    testhooks.pause("after-data")
    tx, schedule = optim.make_training_optimizer(config, len(dataset.train) // config.batch_size)
    if restored is None:
        with timing.phase("init"):
            state = create_train_state(
                model,
                tx,
                config.seed,
                ema=config.ema_decay is not None,
                lookahead=config.lookahead_every > 0,
                init_params=data_init(model, dataset),
            )
            state, history, best = jax.device_put(state, replicated(mesh)), [], -1.0
    else:
        state, history, best = restored.state, restored.history, restored.best
        echo(f"resume: epoch {len(history)} (step {int(state.step)}) from {workdir}", verbose)

    is_main = jax.process_index() == 0  # only one host writes files (orbax: each its part of a checkpoint)
    if is_main:
        ensure_dir(workdir, "--workdir")
        claim_workdir(workdir)
    if is_main and restored is None:
        config.save(workdir / "config.json")
    run = set_up(config, dataset, state, history, schedule, mesh, workdir, is_main, verbose, timing)
    if is_main and restored is not None:
        run.checkpointer.unreadable = list(restored.unreadable)
        run.checkpointer.set_aside_unreadable()
    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            state, record = train_epoch(run, state, epoch)
            record.update(evaluate_epoch(run, state))
            timing.add("train", record["train_seconds"])
            timing.add("eval", record["eval_seconds"])
            best = select_and_save(run, state, record, best)
    finally:
        try:
            with timing.phase("checkpoint"):
                run.checkpointer.close()  # the last save is committed:
            run.writer.write_history()  # history.json lists it
        finally:
            run.writer.close()
    return FitResult(state, run.writer.history)


def mesh_and_model(config: Config) -> tuple[Mesh, nn.Module]:
    """Returns the device mesh of ``config`` (after ``jax.distributed`` start-up with ``--distributed``)
    and its model; ConfigError when the batch sizes do not divide over the devices or cannot fit."""
    if config.distributed:
        distributed.initialize(config)
    mesh = make_mesh(config.num_devices)
    check_divisible(config.batch_size, mesh, "--batch-size")
    check_divisible(config.eval_batch_size, mesh, "--eval-batch-size")
    devices = list(mesh.devices.flat)
    model = build_model(config, devices)
    sizing.check_fits(config, model, devices)
    return mesh, model


def checked_dataset(config: Config, dataset: Dataset | None, restored: Restored | None) -> Dataset:
    """Returns ``dataset`` (default: loaded from ``config``) after checking that it fits the run: its
    class count, for a resumed run the steps per epoch the run was made with, and in a multi-process run
    that every process loaded the same data (``distributed.check_same_data``)."""
    if dataset is None:
        dataset = load_dataset(config)
    for name, split in (("train", dataset.train), ("validation", dataset.val), ("test", dataset.test)):
        if split is not None:
            distributed.check_same_data(f"the {name} split", split.images, split.labels)
    if dataset.num_classes != config.num_classes:
        raise ConfigError(
            f"dataset has {dataset.num_classes} classes, --dataset {config.dataset} needs {config.num_classes}"
        )
    steps_per_epoch = len(dataset.train) // config.batch_size
    if restored is not None and restored.steps_per_epoch != steps_per_epoch:
        raise DataError(
            f"--resume {config.workdir}: the run made {restored.steps_per_epoch} steps per epoch, this data gives "
            f"{steps_per_epoch} ({len(dataset.train)} training images): is --data-dir the data the run started with?"
        )
    return dataset


def set_up(
    config: Config,
    dataset: Dataset,
    state: TrainState,
    history: list[dict[str, Any]],
    schedule: optax.Schedule,
    mesh: Mesh,
    workdir: Path,
    is_main: bool = True,
    verbose: bool = True,
    timing: Timing | None = None,
) -> Run:
    """Returns the ``Run`` of ``config``: the splits replicated on ``mesh``'s devices, the train and eval
    steps compiled for ``state`` (once per run), the history writer (``history.json`` rewritten as
    ``history`` stands) and the checkpointer of ``workdir``. ``timing`` gets the compile seconds."""
    timing = timing or Timing()
    on_all = replicated(mesh)
    train = DeviceSplit.put(dataset.train, on_all)
    splits = {"test": DeviceSplit.put(dataset.test, on_all)}
    if dataset.val is not None:
        splits = {"val": DeviceSplit.put(dataset.val, on_all), **splits}
    val = f"val {len(dataset.val)}, " if dataset.val is not None else ""
    echo(f"data: train {len(train)}, {val}test {len(dataset.test)} images, {dataset.num_classes} classes", verbose)
    params = param_count(state.params)
    echo(f"model: {config.model} width {config.width}, {params:,} parameters, {config.dtype}", verbose)
    steps_per_epoch = len(train) // config.batch_size
    mix_steps = (config.epochs - config.mix_off_epoch) * steps_per_epoch
    mix = MixSpec(config.mixup_alpha, config.cutmix_alpha, config.mix_prob, mix_steps)
    train_step = steps.make_train_step(
        dataset.mean,
        dataset.std,
        AugmentSpec.from_config(config),
        config.cutout_size,
        config.label_smoothing,
        mesh=mesh,
        mix=mix,
        ema_decay=config.ema_decay,
        flip_epoch_steps=steps_per_epoch if config.alternating_flip else 0,
        lookahead=steps.Lookahead(config.lookahead_every, config.lookahead_decay, config.epochs * steps_per_epoch),
    )
    evaluators = {}
    for ema in [False, True] if config.ema_decay is not None else [False]:
        for name, split in splits.items():
            evaluators[("ema_" if ema else "") + name] = Evaluator(
                split, dataset.mean, dataset.std, config.eval_batch_size, tta=config.tta, ema=ema, mesh=mesh
            )
    gather = make_gather_batch(mesh)
    shuffle_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xDA7A)
    t0 = time.perf_counter()
    with timing.phase("compile"):
        rows = shuffled_index_rows(shuffle_key, len(train), steps_per_epoch, config.batch_size)
        train_step = train_step.lower(state, gather(train.images, train.labels, rows, 0)).compile()
        for evaluator in evaluators.values():
            evaluator.compile(state)
    echo(f"compile: {time.perf_counter() - t0:.1f}s (train and eval steps, once per run)", verbose)
    writer = MetricWriter(workdir, history, enabled=is_main)
    writer.write_history()  # matches the checkpoint resumed from (an older one when the newest was broken)
    return Run(
        config=config,
        workdir=workdir,
        num_classes=dataset.num_classes,
        train=train,
        steps_per_epoch=steps_per_epoch,
        shuffle_key=shuffle_key,
        train_step=train_step,
        gather=gather,
        evaluators=evaluators,
        schedule=schedule,
        writer=writer,
        # Several processes: synchronous. orbax's two background writers (latest and best, the same step) would
        # wait at barriers of the same name at once, which the coordination service refuses at random.
        checkpointer=Checkpointer(
            workdir, keep=config.keep_checkpoints, asynchronous=config.async_checkpoints and jax.process_count() == 1
        ),
        mix_enabled=mix.enabled,
        verbose=verbose,
        timing=timing,
    )


def train_epoch(run: Run, state: TrainState, epoch: int) -> tuple[TrainState, dict[str, Any]]:
    """Runs one epoch of train steps (batches of a fresh permutation, with a progress bar) and returns
    the new state and the record so far: ``epoch``, ``step``, ``train_loss``, ``train_acc``, ``lr``,
    ``train_seconds``. Raises DivergedError as soon as a progress refresh sees the loss diverge.

    The step count is kept on the host (every epoch makes ``steps_per_epoch`` steps, a skipped float16 step
    included): the loop reads nothing back from the device but the summed metrics of a progress refresh."""
    config, start = run.config, time.perf_counter()
    first_step = (epoch - 1) * run.steps_per_epoch  # the state's step when the epoch starts
    key = jax.random.fold_in(run.shuffle_key, epoch)
    rows = shuffled_index_rows(key, len(run.train), run.steps_per_epoch, config.batch_size)
    bar = tqdm(
        total=run.steps_per_epoch,
        desc=f"epoch {epoch}/{config.epochs}",
        unit="step",
        leave=False,
        disable=_BAR_DISABLE if run.verbose else True,
        dynamic_ncols=True,
    )
    sums = None
    try:
        for i in range(run.steps_per_epoch):
            state, metrics = run.train_step(state, run.gather(run.train.images, run.train.labels, rows, i))
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            if (i + 1) % config.log_every == 0 or i + 1 == run.steps_per_epoch:
                step = first_step + i + 1
                loss, acc = _mean(sums)
                check_loss(run, "the train loss", loss, epoch, step)
                lr = _learning_rate(run.schedule, step)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * acc:.2f}%", lr=f"{lr:.2e}", refresh=False)
                run.writer.write_scalar("loss/train_running", loss, step)
            bar.update(1)
    finally:
        bar.close()
    loss, acc = _mean(sums)
    step = first_step + run.steps_per_epoch
    record = {"epoch": epoch, "step": step, "train_loss": loss, "train_acc": acc}
    record["lr"] = _learning_rate(run.schedule, step)
    if state.dynamic_scale is not None:  # --dtype float16: steps skipped for non-finite gradients, the loss scale
        record["skipped_steps"] = int(jax.device_get(sums["skipped"]))
        record["loss_scale"] = float(jax.device_get(state.dynamic_scale.scale))
    record["train_seconds"] = time.perf_counter() - start
    return state, record


def _learning_rate(schedule: optax.Schedule, step: int) -> float:
    """Returns the learning rate that step ``step`` (1-based) was taken with, computed on the host."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return float(jax.device_get(schedule(step - 1)))


def _mean(sums: Any) -> tuple[float, float]:
    host = jax.device_get(sums)
    return float(host["loss_sum"] / host["count"]), float(host["correct"] / host["count"])


def evaluate_epoch(run: Run, state: TrainState) -> dict[str, Any]:
    """Returns ``{PREFIX_loss, PREFIX_acc}`` for every evaluator of the run (``test``, ``val``,
    ``ema_test``, ...) and ``eval_seconds``."""
    start = time.perf_counter()
    record: dict[str, Any] = {}
    for prefix, evaluator in run.evaluators.items():
        result = evaluator(state)
        record[f"{prefix}_loss"], record[f"{prefix}_acc"] = result["loss"], result["acc"]
    record["eval_seconds"] = time.perf_counter() - start
    return record


def check_loss(run: Run, what: str, loss: float, epoch: int, step: int) -> None:
    """Raises DivergedError when ``loss`` is nan/inf or beyond ``DIVERGED_LOSS_FACTOR * ln(num_classes)``,
    naming the last epoch saved in the run's workdir."""
    if math.isfinite(loss) and loss <= DIVERGED_LOSS_FACTOR * math.log(run.num_classes):
        return
    epoch_saved = saved_epochs(run.workdir)
    checkpoints = run.workdir / "checkpoints"
    last = f"the last good checkpoint is epoch {epoch_saved} in {checkpoints}" if epoch_saved else "no epoch was saved"
    raise DivergedError(
        f"training diverged: {what} is {loss:.4g} at epoch {epoch}, step {step}; stopped, {last}. Start a new run "
        "with a lower --lr (or --grad-clip)"
    )


def select_and_save(run: Run, state: TrainState, record: dict[str, Any], best: float) -> float:
    """Checks the epoch's losses, then checkpoints ``state`` (also as best when its selection accuracy,
    EMA and validation first, beats ``best``), appends ``record`` to the history (TensorBoard at once,
    ``history.json`` once its checkpoint is committed: at the next save or the end of ``fit``) and prints
    the epoch's summary line. Returns the new best accuracy. Nothing is saved for a diverged epoch."""
    config = run.config
    for key, value in record.items():  # a non-finite eval loss would make a non-finite "best"
        if key.endswith("_loss") and (key == "train_loss" or not math.isfinite(value)):
            check_loss(run, f"the {key.replace('_', ' ')}", value, record["epoch"], record["step"])
    record["seconds"] = record["train_seconds"] + record["eval_seconds"]
    if config.tta != "none":
        record["tta"] = config.tta
    if run.mix_enabled:
        record["train_acc_of"] = "dominant label"
    prefix = "ema_" if config.ema_decay is not None else ""
    selection = record.get(f"{prefix}val_acc", record[f"{prefix}test_acc"])
    with run.timing.phase("checkpoint"):
        run.checkpointer.wait()  # the previous epoch's checkpoint is committed:
    run.writer.write_history()  # history.json lists it, and nothing newer
    meta = {"epoch": record["epoch"], "step": record["step"], "history": [*run.writer.history, record]}
    meta["best"] = max(best, selection)
    with run.timing.phase("checkpoint"):
        run.checkpointer.save(state, meta, selection > best)
    run.writer.write_epoch(record, history=False)
    echo(summary_line(record, config.epochs), run.verbose)
    return meta["best"]


def summary_line(record: dict[str, Any], epochs: int) -> str:
    """Returns the one-line summary of an epoch's record: losses, accuracies, LR and seconds."""
    parts = [f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}"]
    for split in ("train", "val", "test", "ema_val", "ema_test"):
        if f"{split}_loss" in record:
            parts.append(f"{split} loss {record[f'{split}_loss']:.4f} acc {100 * record[f'{split}_acc']:6.2f}%")
    if "skipped_steps" in record:
        parts.append(f"skipped {record['skipped_steps']} (loss scale {record['loss_scale']:g})")
    parts.append(f"lr {record['lr']:.3e}")
    parts.append(f"{record['seconds']:6.1f}s")
    return " | ".join(parts)
