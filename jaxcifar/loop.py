"""The training loop: ``fit(config)`` trains one run and checkpoints every epoch.

The whole dataset lives on the device as uint8; each epoch draws a permutation on the device,
slices fixed-size batches from it (the last partial batch is dropped) and runs the jitted,
AOT-compiled train step, so nothing recompiles inside a run. After each epoch the model is
evaluated on the validation split (if any) and the test split, orbax commits the checkpoint
(latest N, and best), then the record goes to ``history.json`` and TensorBoard.

``fit`` reads as its steps: ``setup.command`` (jax.distributed, the workdir's lock) -> ``check_resume`` ->
``train``: restore or start (``setup.RunSetup``: mesh, model, data on the device, the train step) ->
``set_up`` (compiled steps, writer, checkpointer) -> per epoch ``train_epoch``, ``evaluate_epoch``,
``select_and_save``. The LR range test (``--lr auto``) and the report come around it, in ``jaxcifar.run``,
which calls ``check_resume`` and ``train`` itself (one command: one start-up, one lock).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxcifar import distributed, optim
from jaxcifar.checkpoint import Checkpointer, resume_config
from jaxcifar.config import Config
from jaxcifar.data import Dataset
from jaxcifar.errors import CheckpointError, DivergedError
from jaxcifar.evaluation import Evaluator
from jaxcifar.files import ensure_dir
from jaxcifar.layout import RunDir
from jaxcifar.mesh import replicated
from jaxcifar.progress import BAR_DISABLE as _BAR_DISABLE
from jaxcifar.progress import tqdm
from jaxcifar.setup import RunSetup, command, early_epochs, echo, mesh_and_model
from jaxcifar.state import TrainState, create_train_state
from jaxcifar.timing import Timing
from jaxcifar.workdir import claim_workdir
from jaxcifar.writers import MetricWriter

# The keys of an epoch's history record that hold times: they differ between two runs of the same config (seconds
# of training, of evaluation, of both, and since the command started, at the end of the epoch's evaluation).
TIME_KEYS = ("seconds", "train_seconds", "eval_seconds", "wall_seconds")

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

    setup: RunSetup
    rundir: RunDir
    train_step: Callable[..., Any]  # ``setup.train_step`` compiled for the run's state
    late_train_step: Callable[..., Any] | None  # ``setup.late_train_step`` compiled (after the early epochs)
    evaluators: dict[str, Evaluator]  # history prefix ("test", "ema_val", ...) -> evaluator
    last_epoch_evaluators: dict[str, Evaluator]  # the same, for the last epoch (with TTA under --tta-final-only)
    schedule: optax.Schedule
    writer: MetricWriter
    checkpointer: Checkpointer
    verbose: bool
    timing: Timing

    @property
    def config(self) -> Config:
        """The run's Config."""
        return self.setup.config

    def train_step_for(self, epoch: int) -> Callable[..., Any]:
        """Returns the compiled train step of ``epoch`` (1-based): ``late_train_step`` after the model's early
        parameters stopped training (``setup.early_epochs``), else ``train_step``."""
        early = early_epochs(self.config)
        if self.late_train_step is not None and early is not None and epoch > early:
            return self.late_train_step
        return self.train_step


def check_resume(config: Config, rundir: RunDir, verbose: bool = True) -> tuple[Config, dict[str, Any] | None]:
    """Returns (the config to run, the newest checkpoint's metadata, or None for a fresh run).

    Raises CheckpointError when the workdir holds a run and ``--resume`` is not given; ConfigError when
    the saved run differs in a field that changes training (``checkpoint.resume_config``). Call it
    holding the workdir's lock (``setup.command``): the answer holds only while no other run can write
    the workdir."""
    if not rundir.has_checkpoint():
        if config.resume:
            echo(f"resume: no checkpoint in {rundir.path}, starting from scratch", verbose)
        return config, None
    if not config.resume:
        raise CheckpointError(
            f"--workdir {rundir.path} already holds a run; pass --resume (in Python: config.replace(resume=True)) "
            "to continue it or choose another --workdir"
        )
    config = resume_config(rundir.path, config)
    meta = rundir.read_meta()
    if meta is None:
        raise CheckpointError(f"{rundir.checkpoints}: no checkpoint with readable metadata")
    return config, meta


def restore(config: Config, model: Any, meta: dict[str, Any], mesh: Mesh, rundir: RunDir) -> Restored:
    """Returns the newest intact checkpoint of ``rundir`` (an unreadable newer one is named and skipped)."""
    steps_per_epoch = int(meta["step"]) // int(meta["epoch"])
    tx, _ = optim.make_training_optimizer(config, steps_per_epoch)
    template = create_train_state(
        model, tx, config.seed, ema=config.ema_decay is not None, lookahead=config.lookahead_every > 0
    )
    checkpointer = Checkpointer(rundir.path, keep=config.keep_checkpoints, asynchronous=False)
    try:
        restored = checkpointer.restore_latest(template)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"{rundir.checkpoints}: no checkpoint to resume")
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
    ``config.workdir`` (``layout.RunDir``), holding its lock from before it reads the workdir until it
    ends (``setup.command``). With
    ``config.resume`` it continues from the newest intact checkpoint (same result as an
    uninterrupted run); every field that changes training must equal the saved config, and a
    finished run is returned as it is. ``dataset`` overrides loading from ``config``'s source.
    ``config.lr`` must be a number (``jaxcifar.run`` resolves ``"auto"`` first). Raises
    ``JaxcifarError`` subclasses on user errors (before anything in the workdir changes), and
    ``DivergedError`` when the loss becomes non-finite (the diverged epoch is not saved). ``timing``
    collects the seconds of data loading, compiling, training, evaluation and checkpoint waits.
    """
    with command(config, config.workdir) as rundir:  # before anything is read from the workdir or decided about it
        config, meta = check_resume(config, rundir, verbose and distributed.is_main_process())
        return train(config, rundir, meta, dataset, verbose=verbose, timing=timing)


def train(
    config: Config,
    rundir: RunDir,
    meta: dict[str, Any] | None,
    dataset: Dataset | None = None,
    *,
    setup: RunSetup | None = None,
    verbose: bool = True,
    timing: Timing | None = None,
) -> FitResult:
    """``fit`` once its command has started (``setup.command``) and ``check_resume`` has given ``config`` and
    ``meta``. ``setup``: the run's ``RunSetup`` when the caller made it already (``jaxcifar.run`` after the LR
    range test); else it is made here from ``dataset``."""
    timing = timing or Timing()
    shown, verbose = verbose, verbose and distributed.is_main_process()  # other processes print their devices line
    if meta is None or int(meta["epoch"]) < config.epochs:
        claim_workdir(rundir.path)  # decided: this command trains in the workdir (a refused one names its pid)
    optim.peak_lr(config)  # a number: --lr auto is resolved by jaxcifar.run before fit
    restored = None
    if meta is not None:
        with timing.phase("init"):
            mesh, model = mesh_and_model(config)
            restored = restore(config, model, meta, mesh, rundir)
        if len(restored.history) >= config.epochs:
            echo(
                f"already finished: {len(restored.history)}/{config.epochs} epochs in {rundir.path}; nothing to do (a "
                f"longer run is a new run in another --workdir; python -m jaxcifar.report --workdir {rundir.path} "
                "writes the report)",
                verbose,
            )
            return FitResult(restored.state, restored.history)
        setup = RunSetup.create(
            config,
            dataset,
            mesh_model=(mesh, model),
            steps_per_epoch=restored.steps_per_epoch,
            verbose=shown,
            timing=timing,
        )
    elif setup is None:
        setup = RunSetup.create(config, dataset, verbose=shown, timing=timing)
    tx, schedule = setup.training_optimizer()
    echo(compiling_line(setup), verbose)
    if restored is None:
        with timing.phase("init"):
            state, history, best = setup.initial_state(tx), [], -1.0
    else:
        state, history, best = restored.state, restored.history, restored.best
        echo(f"resume: epoch {len(history)} (step {int(state.step)}) from {rundir.path}", verbose)
    is_main = jax.process_index() == 0  # only one host writes files (orbax: each its part of a checkpoint)
    if is_main:
        ensure_dir(rundir.path, "--workdir")
        claim_workdir(rundir.path)
    if is_main and restored is None:
        config.save(rundir.config_json)
    run = set_up(setup, state, history, schedule, rundir, is_main, verbose, timing)
    if is_main and restored is not None:
        run.checkpointer.unreadable = list(restored.unreadable)
        run.checkpointer.set_aside_unreadable()
    return FitResult(*_epochs(run, state, history, best))


def _epochs(run: Run, state: TrainState, history: list[dict[str, Any]], best: float) -> tuple[TrainState, list]:
    """Trains the epochs after ``history`` and returns (the final state, the whole history)."""
    try:
        for epoch in range(len(history) + 1, run.config.epochs + 1):
            state, record = train_epoch(run, state, epoch)
            record.update(evaluate_epoch(run, state, epoch))
            run.timing.add("train", record["train_seconds"])
            run.timing.add("eval", record["eval_seconds"])
            best = select_and_save(run, state, record, best)
    finally:
        try:
            with run.timing.phase("checkpoint"):
                run.checkpointer.close()  # the last save is committed:
            run.writer.write_history()  # history.json lists it
        finally:
            run.writer.close()
    return state, run.writer.history


def compiling_line(setup: RunSetup) -> str:
    """Returns the line printed before the state is made and the steps compile (the longest silence of a first
    run): what is happening and how long it takes."""
    platform = setup.mesh.devices.flat[0].platform
    took = "~30 s on a CPU" if platform == "cpu" else "a few seconds to a minute"
    cached = "; loaded from the compile cache afterwards" if setup.config.compile_cache else ""
    return f"compiling the train and eval steps (first run of this configuration: {took}{cached})..."


def set_up(
    setup: RunSetup,
    state: TrainState,
    history: list[dict[str, Any]],
    schedule: optax.Schedule,
    rundir: RunDir,
    is_main: bool = True,
    verbose: bool = True,
    timing: Timing | None = None,
) -> Run:
    """Returns the ``Run`` of ``setup``: its train step and evaluators compiled for ``state`` (once per run),
    the history writer (``history.json`` rewritten as ``history`` stands) and the checkpointer of ``rundir``.
    ``timing`` gets the compile seconds."""
    timing, config = timing or Timing(), setup.config
    evaluators = setup.evaluators("none" if config.tta_final_only else None)
    last_epoch_evaluators = setup.evaluators() if config.tta_final_only else evaluators
    t0 = time.perf_counter()
    with timing.phase("compile"):
        first_batch = setup.batch(setup.epoch_rows(1), 0)
        train_step = setup.train_step.lower(state, first_batch).compile()
        late_train_step = None
        if setup.late_train_step is not None:
            late_train_step = setup.late_train_step.lower(state, first_batch).compile()
        for evaluator in {id(e): e for e in [*evaluators.values(), *last_epoch_evaluators.values()]}.values():
            evaluator.compile(state)
    echo(f"compile: {time.perf_counter() - t0:.1f}s (train and eval steps, once per run)", verbose)
    writer = MetricWriter(rundir.path, history, enabled=is_main)
    writer.write_history()  # matches the checkpoint resumed from (an older one when the newest was broken)
    # Several processes: synchronous. orbax's two background writers (latest and best, the same step) would
    # wait at barriers of the same name at once, which the coordination service refuses at random.
    asynchronous = config.async_checkpoints and jax.process_count() == 1
    return Run(
        setup=setup,
        rundir=rundir,
        train_step=train_step,
        late_train_step=late_train_step,
        evaluators=evaluators,
        last_epoch_evaluators=last_epoch_evaluators,
        schedule=schedule,
        writer=writer,
        checkpointer=Checkpointer(rundir.path, keep=config.keep_checkpoints, asynchronous=asynchronous),
        verbose=verbose,
        timing=timing,
    )


def train_epoch(run: Run, state: TrainState, epoch: int) -> tuple[TrainState, dict[str, Any]]:
    """Runs one epoch of train steps (batches of a fresh permutation, with a progress bar) and returns
    the new state and the record so far: ``epoch``, ``step``, ``train_loss``, ``train_acc``, ``lr``,
    ``train_seconds``. Raises DivergedError as soon as a progress refresh sees the loss diverge.

    The step count is kept on the host (every epoch makes ``steps_per_epoch`` steps, a skipped float16 step
    included): the loop reads nothing back from the device but the summed metrics of a progress refresh."""
    config, setup, start = run.config, run.setup, time.perf_counter()
    steps_per_epoch = setup.steps_per_epoch
    first_step = (epoch - 1) * steps_per_epoch  # the state's step when the epoch starts
    rows = setup.epoch_rows(epoch)
    train_step = run.train_step_for(epoch)
    bar = tqdm(
        total=steps_per_epoch,
        desc=f"epoch {epoch}/{config.epochs}",
        unit="step",
        leave=False,
        disable=_BAR_DISABLE if run.verbose else True,
        dynamic_ncols=True,
    )
    sums = None
    try:
        for i in range(steps_per_epoch):
            state, metrics = train_step(state, setup.batch(rows, i))
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            if (i + 1) % config.log_every == 0 or i + 1 == steps_per_epoch:
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
    step = first_step + steps_per_epoch
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


def evaluate_epoch(run: Run, state: TrainState, epoch: int) -> dict[str, Any]:
    """Returns ``{PREFIX_loss, PREFIX_acc}`` for every evaluator of the run (``test``, ``val``,
    ``ema_test``, ...) at ``epoch`` (from 1; the last one's evaluators differ under ``--tta-final-only``),
    ``eval_seconds``, and when the evaluation used test-time views ``tta`` (the mode) and
    ``{PREFIX_plain_loss, PREFIX_plain_acc}`` (those of the unaltered images alone)."""
    start = time.perf_counter()
    record: dict[str, Any] = {}
    evaluators = run.last_epoch_evaluators if epoch == run.config.epochs else run.evaluators
    for prefix, evaluator in evaluators.items():
        for metric, value in evaluator(state).items():  # loss, acc and, with TTA, plain_loss, plain_acc
            record[f"{prefix}_{metric}"] = value
        if evaluator.tta != "none":
            record["tta"] = evaluator.tta
    record["eval_seconds"] = time.perf_counter() - start
    return record


def check_loss(run: Run, what: str, loss: float, epoch: int, step: int) -> None:
    """Raises DivergedError when ``loss`` is nan/inf or beyond ``DIVERGED_LOSS_FACTOR * ln(num_classes)``,
    naming the last epoch saved in the run's workdir."""
    if math.isfinite(loss) and loss <= DIVERGED_LOSS_FACTOR * math.log(run.setup.dataset.num_classes):
        return
    epoch_saved = run.rundir.saved_epochs()
    where = run.rundir.checkpoints
    last = f"the last good checkpoint is epoch {epoch_saved} in {where}" if epoch_saved else "no epoch was saved"
    raise DivergedError(
        f"training diverged: {what} is {loss:.4g} at epoch {epoch}, step {step}; stopped, {last}. Start a new run "
        "with a lower --lr (or --grad-clip)"
    )


def select_and_save(run: Run, state: TrainState, record: dict[str, Any], best: float) -> float:
    """Checks the epoch's losses, then checkpoints ``state`` (also as best when its selection accuracy,
    EMA and validation first, the plain one under ``--tta-final-only``, beats ``best``), appends ``record``
    to the history (TensorBoard at once, ``history.json`` once its checkpoint is committed: at the next
    save or the end of ``fit``) and prints the epoch's summary line. Returns the new best accuracy.
    Nothing is saved for a diverged epoch."""
    config = run.config
    for key, value in record.items():  # a non-finite eval loss would make a non-finite "best"
        if key.endswith("_loss") and (key == "train_loss" or not math.isfinite(value)):
            check_loss(run, f"the {key.replace('_', ' ')}", value, record["epoch"], record["step"])
    record["seconds"] = record["train_seconds"] + record["eval_seconds"]
    record["wall_seconds"] = round(time.perf_counter() - run.timing.started, 3)
    if run.setup.mix_enabled:
        record["train_acc_of"] = "dominant label"
    prefix = "ema_" if config.ema_decay is not None else ""
    split = f"{prefix}val" if f"{prefix}val_acc" in record else f"{prefix}test"
    selection = record[f"{split}_acc"]
    if config.tta_final_only:  # the other epochs were evaluated plain: compare the last one's plain accuracy
        selection = record.get(f"{split}_plain_acc", selection)
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
            part = f"{split} loss {record[f'{split}_loss']:.4f} acc {100 * record[f'{split}_acc']:6.2f}%"
            if f"{split}_plain_acc" in record:  # a TTA epoch: the views' accuracy, then the plain images' alone
                part += f" (plain {100 * record[f'{split}_plain_acc']:.2f}%)"
            parts.append(part)
    if "skipped_steps" in record:
        parts.append(f"skipped {record['skipped_steps']} (loss scale {record['loss_scale']:g})")
    parts.append(f"lr {record['lr']:.3e}")
    parts.append(f"{record['seconds']:6.1f}s")
    return " | ".join(parts)
