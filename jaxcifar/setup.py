"""One run's set-up, shared by ``jaxcifar.run``, ``fit`` and ``lr_find``.

``command(config, workdir)`` starts a command once: ``jax.distributed`` with ``--distributed`` (one
configuration check across the processes) and the workdir's lock (``workdir.holding``). ``RunSetup.create``
is then built once from the Config and its data: the mesh, the model, the training split on the devices,
the batches of each epoch, the train step and the initial state. The LR range test and training run the
same ``RunSetup.train_step`` (one jitted function, made with the same arguments); only the optimizer's
LR schedule differs between them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from jaxcifar import backend, distributed, optim, sizing, steps, testhooks
from jaxcifar.augmentation import AugmentSpec
from jaxcifar.batches import Batch, DeviceSplit, make_gather_batch, shuffled_index_rows
from jaxcifar.config import Config
from jaxcifar.data import Dataset, load_dataset
from jaxcifar.errors import ConfigError, DataError
from jaxcifar.evaluation import Evaluator
from jaxcifar.layout import RunDir
from jaxcifar.mesh import check_divisible, make_mesh, replicated
from jaxcifar.mesh import describe as describe_mesh
from jaxcifar.mixing import MixSpec
from jaxcifar.network import build_model, data_init
from jaxcifar.progress import tqdm
from jaxcifar.sources import default_cache_dir
from jaxcifar.state import TrainState, create_train_state
from jaxcifar.timing import Timing
from jaxcifar.workdir import claim_workdir, holding

SHUFFLE_SALT = 0xDA7A  # folded into the run's seed: the key of every epoch's permutation


def echo(message: str, verbose: bool) -> None:
    """Prints one line (above a progress bar, if one is open) when ``verbose``."""
    if verbose:
        tqdm.write(message, file=sys.stdout)


@contextlib.contextmanager
def command(config: Config, workdir: str | Path | None = None, claim: bool = False) -> Iterator[RunDir | None]:
    """Starts a command that writes a workdir and yields its ``RunDir`` (None when ``workdir`` is None).

    With ``config.distributed``, first ``jax.distributed`` start-up and the check that every process runs
    this config (everything after may be collective). Then the workdir's exclusive lock is held until the
    block ends (``workdir.holding``: taken by process 0, one collective), from before anything is read from
    or decided about the workdir; with ``claim`` this process's pid goes into it at once (a command that
    surely writes it), else the command calls ``workdir.claim_workdir`` once it has decided. The callers
    (``jaxcifar.run``, ``fit``, ``lr_find``) do this once per command; what they call inside does not again.
    """
    if config.distributed:
        distributed.initialize(config)
    if workdir is None:
        yield None
        return
    with holding(workdir, is_main=distributed.is_main_process(), every_process=distributed.every_process) as path:
        if claim:
            claim_workdir(path)
        yield RunDir(path)


def mesh_and_model(config: Config) -> tuple[Mesh, nn.Module]:
    """Returns the device mesh of ``config`` and its model; ConfigError when the batch sizes do not divide over
    the devices or cannot fit (``sizing.check_fits``). Call it after ``command`` (jax.distributed start-up)."""
    mesh = make_mesh(config.num_devices)
    check_divisible(config.batch_size, mesh, "--batch-size")
    check_divisible(config.eval_batch_size, mesh, "--eval-batch-size")
    devices = list(mesh.devices.flat)
    model = build_model(config, devices)
    sizing.check_fits(config, model, devices)
    return mesh, model


def checked_dataset(config: Config, dataset: Dataset | None, steps_per_epoch: int | None = None) -> Dataset:
    """Returns ``dataset`` (default: loaded from ``config``) after checking that it fits the run: its class
    count, for a resumed run the ``steps_per_epoch`` it was made with, and in a multi-process run that every
    process loaded the same data (``distributed.check_same_data``)."""
    if dataset is None:
        dataset = load_dataset(config)
    for name, split in (("train", dataset.train), ("validation", dataset.val), ("test", dataset.test)):
        if split is not None:
            distributed.check_same_data(f"the {name} split", split.images, split.labels)
    if dataset.num_classes != config.num_classes:
        raise ConfigError(
            f"dataset has {dataset.num_classes} classes, --dataset {config.dataset} needs {config.num_classes}"
        )
    found = len(dataset.train) // config.batch_size
    if steps_per_epoch is not None and steps_per_epoch != found:
        raise DataError(
            f"--resume {config.workdir}: the run made {steps_per_epoch} steps per epoch, this data gives "
            f"{found} ({len(dataset.train)} training images): is --data-dir the data the run started with?"
        )
    return dataset


def early_epochs(config: Config) -> int | None:
    """Returns the epochs in which the model's early parameters train (``config.whiten_bias_epochs``: airbench's
    whitening bias), after which a run trains with ``RunSetup.late_train_step``, which holds them constant;
    None when the model has no early parameters or they train to the last epoch (one train step for the run)."""
    if not optim.late_frozen_params(config.model) or config.whiten_bias_epochs >= config.epochs:
        return None
    return config.whiten_bias_epochs


def make_train_step(
    config: Config, dataset: Dataset, mesh: Mesh, constant_params: tuple[str, ...] = ()
) -> Callable[[TrainState, Batch], Any]:
    """Returns the jitted train step of ``config`` (``steps.make_train_step`` with every setting of the run:
    augmentation, MixUp/CutMix until ``--mix-off-epoch``, EMA, alternating flip, Lookahead), taking the
    parameters named in ``constant_params`` as constants (``steps.train_step``)."""
    steps_per_epoch = len(dataset.train) // config.batch_size
    mix_steps = (config.epochs - config.mix_off_epoch) * steps_per_epoch
    return steps.make_train_step(
        dataset.mean,
        dataset.std,
        AugmentSpec.from_config(config),
        config.cutout_size,
        config.label_smoothing,
        mesh=mesh,
        mix=MixSpec(config.mixup_alpha, config.cutmix_alpha, config.mix_prob, mix_steps),
        ema_decay=config.ema_decay,
        flip_epoch_steps=steps_per_epoch if config.alternating_flip else 0,
        lookahead=steps.Lookahead(config.lookahead_every, config.lookahead_decay, config.epochs * steps_per_epoch),
        constant_params=constant_params,
    )


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a run is made of, built once per command by ``create``: the config, the mesh, the model, the data
    (on the host, and the training split replicated on the mesh's devices), the batch gatherer, the key of the
    epochs' permutations and the jitted train steps (not compiled yet: the state's optimizer decides that):
    ``train_step``, and ``late_train_step`` for the epochs after ``early_epochs(config)`` (None without them)."""

    config: Config
    mesh: Mesh
    model: nn.Module
    dataset: Dataset
    train: DeviceSplit
    gather: Callable[..., Batch]
    shuffle_key: jax.Array
    train_step: Callable[[TrainState, Batch], Any]
    late_train_step: Callable[[TrainState, Batch], Any] | None = None

    @classmethod
    def create(
        cls,
        config: Config,
        dataset: Dataset | None = None,
        *,
        mesh_model: tuple[Mesh, nn.Module] | None = None,
        steps_per_epoch: int | None = None,
        verbose: bool = True,
        timing: Timing | None = None,
    ) -> RunSetup:
        """Returns the set-up of ``config`` on ``dataset`` (default: loaded from ``config``; checked by
        ``checked_dataset``, with the ``steps_per_epoch`` of a resumed run) on ``mesh_model`` (default:
        ``mesh_and_model(config)``). Prints the devices line (every
        process) and the data and model lines (process 0) when ``verbose``. ``timing`` gets the seconds of
        ``init`` and ``data``. Raises ConfigError/DataError before anything is compiled (also for an LR schedule
        that these steps cannot make, when ``lr`` is a number)."""
        timing = timing or Timing()
        if config.compile_cache:
            backend.enable_compile_cache(default_cache_dir() / "xla")
        with timing.phase("init"):
            mesh, model = mesh_model or mesh_and_model(config)
        echo(describe_mesh(mesh), verbose)
        with timing.phase("data"):
            dataset = checked_dataset(config, dataset, steps_per_epoch)
        testhooks.pause("after-data")
        if not isinstance(config.lr, str):  # a schedule these steps cannot make (--pct-start) refused before any work
            optim.make_training_optimizer(config, len(dataset.train) // config.batch_size)
        setup = cls(
            config=config,
            mesh=mesh,
            model=model,
            dataset=dataset,
            train=DeviceSplit.put(dataset.train, replicated(mesh)),
            gather=make_gather_batch(mesh),
            shuffle_key=jax.random.fold_in(jax.random.PRNGKey(config.seed), SHUFFLE_SALT),
            train_step=make_train_step(config, dataset, mesh),
            late_train_step=(
                None
                if early_epochs(config) is None
                else make_train_step(config, dataset, mesh, optim.late_frozen_params(config.model))
            ),
        )
        for line in setup.describe():
            echo(line, verbose and distributed.is_main_process())
        return setup

    def describe(self) -> list[str]:
        """Returns the ``data: ...`` and ``model: ...`` lines a run prints before it compiles."""
        data, config = self.dataset, self.config
        val = f"val {len(data.val)}, " if data.val is not None else ""
        params = sizing.param_count(self.model)
        return [
            f"data: train {len(data.train)}, {val}test {len(data.test)} images, {data.num_classes} classes",
            f"model: {config.model} width {config.width}, {params:,} parameters, {config.dtype}",
        ]

    @property
    def steps_per_epoch(self) -> int:
        """Train steps per epoch: whole batches of the training split (the last partial batch is dropped)."""
        return len(self.train) // self.config.batch_size

    @property
    def mix_enabled(self) -> bool:
        """True when the train step can mix images (MixUp/CutMix): its accuracy counts the dominant label."""
        return MixSpec(self.config.mixup_alpha, self.config.cutmix_alpha, self.config.mix_prob).enabled

    def with_config(self, config: Config) -> RunSetup:
        """Returns this set-up for ``config``, which must differ from this one's only in ``lr`` (the LR range test
        resolves ``"auto"`` after the set-up was made; nothing built here depends on the LR)."""
        if config.replace(lr=self.config.lr) != self.config:
            raise ValueError("a RunSetup serves one configuration (only lr may be resolved later)")
        return dataclasses.replace(self, config=config)

    def training_optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """Returns (optimizer, LR schedule) of the run: ``optim.make_training_optimizer`` (``lr`` a number)."""
        return optim.make_training_optimizer(self.config, self.steps_per_epoch)

    def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        """Returns the run's optimizer driven by another LR ``schedule`` (the LR range test's), with the constant
        ``--momentum``; parameter groups and weight decay as in training."""
        return optim.make_optimizer(self.config, schedule, steps_per_epoch=self.steps_per_epoch)

    def initial_state(self, tx: optax.GradientTransformation) -> TrainState:
        """Returns the fresh TrainState of the run with optimizer ``tx`` (EMA and Lookahead copies when the
        config keeps them; the model's data-dependent init from the training images), replicated on the mesh."""
        state = create_train_state(
            self.model,
            tx,
            self.config.seed,
            ema=self.config.ema_decay is not None,
            lookahead=self.config.lookahead_every > 0,
            init_params=data_init(self.model, self.dataset),
        )
        return jax.device_put(state, replicated(self.mesh))

    def epoch_rows(self, epoch: int) -> jax.Array:
        """Returns int32 (steps_per_epoch, batch_size): the training images of each step of ``epoch`` (from 1)."""
        key = jax.random.fold_in(self.shuffle_key, epoch)
        return shuffled_index_rows(key, len(self.train), self.steps_per_epoch, self.config.batch_size)

    def batch(self, rows: jax.Array, step: int) -> Batch:
        """Returns batch ``step`` (0-based, within the epoch) of ``epoch_rows``, sharded over the mesh."""
        return self.gather(self.train.images, self.train.labels, rows, step)

    def evaluators(self, tta: str | None = None) -> dict[str, Evaluator]:
        """Returns the run's evaluators, by history prefix (``val``, ``test``, ``ema_val``, ``ema_test``): the
        validation (if any) and test splits replicated on the mesh, with the run's batch size and ``tta`` (the
        run's ``--tta`` when None)."""
        on_all = replicated(self.mesh)
        data, config = self.dataset, self.config
        splits = {"val": data.val, "test": data.test} if data.val is not None else {"test": data.test}
        on_device = {name: DeviceSplit.put(split, on_all) for name, split in splits.items()}
        evaluators = {}
        for ema in [False, True] if config.ema_decay is not None else [False]:
            for name, split in on_device.items():
                evaluators[("ema_" if ema else "") + name] = Evaluator(
                    split, data.mean, data.std, config.eval_batch_size, tta=tta or config.tta, ema=ema, mesh=self.mesh
                )
        return evaluators
