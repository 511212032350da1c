"""The run configuration: one frozen dataclass shared by the CLI and Python users.

Every field carries its help text in ``metadata["help"]``; ``jaxcifar.cli`` turns the fields into
``python -m jaxcifar.train`` flags (``train_subset`` -> ``--train-subset``), so the two can't drift.
Defaults reproduce the assignment run: ResNet18, 20 epochs, SGD (Nesterov) + OneCycle.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import models
from jaxcifar.errors import ConfigError

DATA_SOURCES = ("auto", "tfds", "cifar-python", "folder", "synthetic")
DATASETS = ("cifar10", "cifar100")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "multistep", "warmup-cosine", "constant")
AUGMENTS = ("none", "flip", "crop-flip", "crop-flip-cutout")
DTYPES = ("float32", "bfloat16")


def _field(default: Any, help: str, **metadata: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Invalid values raise ``ConfigError`` on construction."""

    # Model.
    model: str = _field("resnet18", "Model name.", choices=models.available_models())
    width: int = _field(64, "Base channel count of the ResNet (64 is the standard ResNet18/34).")
    dtype: str = _field("float32", "Compute dtype; params and optimizer state stay float32.", choices=DTYPES)
    # Data.
    dataset: str = _field("cifar10", "Dataset (decides the class count and normalization).", choices=DATASETS)
    data_source: str = _field(
        "auto",
        "Where images come from: tfds (tensorflow-datasets, needs TensorFlow to build the data once), "
        "cifar-python (the official python tarball or its folder in --data-dir, or downloaded with "
        "--download), folder (train/<class>/*.jpg and test/<class>/*.jpg under --data-dir), synthetic "
        "(a small learnable problem for smoke runs). auto: folder or cifar-python when --data-dir "
        "holds one, else tfds.",
        choices=DATA_SOURCES,
    )
    data_dir: str | None = _field(None, "Data directory (or the cifar-python tarball) for the chosen source.")
    download: bool = _field(False, "cifar-python: download the official tarball into the cache if absent.")
    resize: bool = _field(False, "folder: resize images that are not 32x32 instead of rejecting them.")
    val_fraction: float = _field(
        0.0, "Fraction of the training set held out (stratified, seeded) as a validation split, in [0, 1)."
    )
    train_subset: int | None = _field(None, "Use only this many training images (stratified, seeded).")
    test_subset: int | None = _field(None, "Use only this many test images (stratified, seeded).")
    augment: str = _field(
        "crop-flip",
        "On-device augmentation: random 32x32 crop of the 4-px zero-padded image, horizontal flip, "
        "and optionally cutout.",
        choices=AUGMENTS,
    )
    cutout_size: int = _field(8, "Side in pixels of the cutout square (crop-flip-cutout only).")
    # Optimization.
    epochs: int = _field(20, "Number of training epochs.")
    batch_size: int = _field(512, "Training batch size (the last partial batch of each epoch is dropped).")
    eval_batch_size: int = _field(1000, "Evaluation batch size (the last batch is padded and masked).")
    optimizer: str = _field("sgd", "Optimizer (optax).", choices=OPTIMIZERS)
    lr: float = _field(0.4, "Peak learning rate (the max LR of onecycle, the initial LR of the others).")
    momentum: float = _field(0.9, "SGD momentum, or Adam/AdamW beta1.")
    nesterov: bool = _field(True, "SGD: Nesterov momentum (--no-nesterov turns it off).")
    weight_decay: float = _field(
        5e-4,
        "Weight decay on all parameters. sgd and adam: coupled L2 added to the gradient, as PyTorch's "
        "SGD/Adam weight_decay; adamw: decoupled, multiplied by the LR, as PyTorch's AdamW.",
    )
    grad_clip: float = _field(0.0, "Clip gradients to this global L2 norm before weight decay; 0 = off.")
    label_smoothing: float = _field(0.0, "Label smoothing of the cross-entropy, in [0, 1).")
    schedule: str = _field(
        "onecycle",
        "LR schedule, stepped per batch: onecycle (PyTorch OneCycleLR, cosine), cosine (to 0), multistep "
        "(x gamma at each milestone epoch), warmup-cosine (linear warm-up then cosine to 0), constant.",
        choices=SCHEDULES,
    )
    pct_start: float = _field(0.3, "onecycle: fraction of the steps spent increasing the LR.")
    div_factor: float = _field(25.0, "onecycle: initial LR = lr / div_factor.")
    final_div_factor: float = _field(1e4, "onecycle: final LR = initial LR / final_div_factor.")
    milestones: tuple[int, ...] = _field((10, 15), "multistep: epochs at which the LR is multiplied by gamma.")
    gamma: float = _field(0.1, "multistep: LR factor at each milestone.")
    warmup_epochs: float = _field(1.0, "warmup-cosine: epochs of linear warm-up from 0.")
    # Run.
    num_devices: int = _field(
        0, "Devices to split each batch over (data parallel, one jitted step); 0 = all devices of all hosts."
    )
    distributed: bool = _field(
        False,
        "Multi-host (TPU pods, several GPU hosts): call jax.distributed.initialize() first (auto-detected on "
        "TPU/Slurm/Open MPI, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).",
    )
    seed: int = _field(0, "Random seed (initialization, data order, augmentation, splits).")
    workdir: str = _field("runs/resnet18", "Directory for config.json, history.json, checkpoints, TensorBoard.")
    resume: bool = _field(False, "Continue the run in --workdir from its latest checkpoint.")
    keep_checkpoints: int = _field(2, "How many latest checkpoints to keep (the best one is kept apart).")
    log_every: int = _field(20, "Refresh the progress bar's loss/acc every this many steps.")
    report: bool = _field(
        False,
        "After training, write curves, misclassified and Grad-CAM galleries (layer3), the confusion matrix and "
        "report.json into --workdir (as python -m jaxcifar.report) and log the pictures to TensorBoard.",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{flag(f.name)}: {value!r} is not one of {', '.join(allowed)}")
        if isinstance(self.milestones, list):
            object.__setattr__(self, "milestones", tuple(self.milestones))
        _check(self.width >= 1, "width", "must be >= 1")
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        _check(self.train_subset is None or self.train_subset >= 1, "train_subset", "must be >= 1")
        _check(self.test_subset is None or self.test_subset >= 1, "test_subset", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        _check(0.0 < self.pct_start < 1.0, "pct_start", "must be in (0, 1)")
        _check(self.div_factor > 0 and self.final_div_factor > 0, "div_factor", "and --final-div-factor must be > 0")
        _check(all(m >= 1 for m in self.milestones), "milestones", "must be epochs >= 1")
        _check(self.gamma > 0, "gamma", "must be > 0")
        _check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        _check(1 <= self.cutout_size <= 32, "cutout_size", "must be in [1, 32]")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.log_every >= 1, "log_every", "must be >= 1")
        _check(self.num_devices >= 0, "num_devices", "must be >= 0 (0 = all)")
        _check(self.data_source != "folder" or self.data_dir is not None, "data_dir", "is required with folder")

    @property
    def num_classes(self) -> int:
        """Class count of ``dataset``."""
        return 100 if self.dataset == "cifar100" else 10

    def replace(self, **changes: Any) -> Config:
        """Returns a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-serializable dict."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """Builds a Config from ``to_dict`` output; unknown keys raise ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Writes the config as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Reads a config written by ``save``."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def flag(name: str) -> str:
    """Returns the CLI flag of a config field: ``train_subset`` -> ``--train-subset``."""
    return "--" + name.replace("_", "-")


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{flag(name)} {what}")
