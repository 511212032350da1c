"""The run configuration: one frozen dataclass shared by the CLI and Python users.

Every field carries its help text in ``metadata["help"]``; ``jaxcifar.cli`` turns the fields into
``python -m jaxcifar.train`` flags (``train_subset`` -> ``--train-subset``), so the two can't drift.
Defaults reproduce the assignment run: ResNet18, 20 epochs, SGD (Nesterov) + OneCycle.

A leaf: it imports only the standard library and jaxcifar's stdlib-only ``names``, ``errors`` and ``files``
(no jax, flax or numpy), so building and validating a Config, and a command's ``--help``, start at once. The
allowed values come from ``jaxcifar.names``; a check that needs the data or the devices happens where they
are (e.g. ``--num-devices`` against the devices present, in the run's set-up).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxcifar.errors import ConfigError
from jaxcifar.files import read_json, write_json
from jaxcifar.names import (
    AUGMENT_MODES,
    CONV_IMPLS,
    DATA_SOURCES,
    DATASETS,
    DTYPES,
    FILLS,
    INTERPOLATIONS,
    MODELS,
    OPTIMIZERS,
    PAD_MODES,
    POLICIES,
    SCHEDULES,
    TTA_MODES,
)


def _field(default: Any, help: str, **metadata: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Invalid values raise ``ConfigError`` on construction."""

    # Model.
    model: str = _field("resnet18", "Model name.", choices=MODELS)
    width: int = _field(
        64,
        "Base channel count (64 is the standard): of ResNet18/34's first stage, ResNet-9's prep layer, airbench's "
        "block1 (its blocks 2 and 3 have 4 x width).",
    )
    dtype: str = _field(
        "float32",
        "Compute dtype; params, optimizer state, BatchNorm statistics and the loss stay float32. bfloat16 for TPUs "
        "and A100/H100/L4-class GPUs; float16 (with dynamic loss scaling; overflowing steps are skipped) for GPUs "
        "without bfloat16 tensor cores (T4, V100); float32 on CPU.",
        choices=DTYPES,
    )
    conv_impl: str = _field(
        "auto",
        "Convolution implementation (speed only, same parameters and results up to float rounding): lax = XLA's "
        "convolution and gradients; matmul = jaxcifar's custom gradients (matmul weight gradient, polyphase strided "
        "input gradient; faster with XLA:CPU); auto = matmul where it was measured faster on one CPU device, lax on "
        "GPU, TPU and several devices (jaxcifar.backend).",
        choices=CONV_IMPLS,
    )
    # Data.
    dataset: str = _field("cifar10", "Dataset (decides the class count and normalization).", choices=DATASETS)
    data_source: str = _field(
        "auto",
        "Where images come from: tfds (tensorflow-datasets, needs TensorFlow to build the data once), "
        "cifar-python (the official python tarball or its folder in --data-dir, or downloaded with "
        "--download), folder (train/<class>/*.jpg and test/<class>/*.jpg under --data-dir), synthetic "
        "(a small learnable problem for smoke runs). auto: with --data-dir, folder, cifar-python or a prepared "
        "tfds folder, whichever it holds (anything else is an error); without it, tfds.",
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
        "On-device augmentation: random 32x32 crop of the padded image (--crop-padding px, 4; --pad-mode, zeros), "
        "horizontal flip, and optionally cutout.",
        choices=AUGMENT_MODES,
    )
    cutout_size: int = _field(8, "Side in pixels of the cutout square (crop-flip-cutout only).")
    crop_padding: int = _field(4, "Pixels of padding on each side before the random 32x32 crop (crop-flip*).")
    pad_mode: str = _field(
        "zeros",
        "How the crop's padding is filled: zeros (black, as torchvision's RandomCrop(padding=4)) or reflect "
        "(mirrored pixels, airbench's translation).",
        choices=PAD_MODES,
    )
    alternating_flip: bool = _field(
        False,
        "Instead of a coin per image and step, flip each training image on every other epoch: a fixed coin per "
        "image decides epoch 1, then the whole set flips on alternate epochs (airbench). Needs an --augment "
        "that flips.",
    )
    policy: str = _field(
        "none",
        "Auto-augment policy after crop and flip, per image on the device, as torchvision defines it: autoaugment "
        "(AutoAugment's CIFAR-10 policy, 25 sub-policies), randaugment (--randaugment-n ops at magnitude "
        "--randaugment-m), trivialaugment (TrivialAugmentWide: one op at a random magnitude).",
        choices=POLICIES,
    )
    randaugment_n: int = _field(2, "randaugment: number of ops per image (torchvision's num_ops).")
    randaugment_m: int = _field(9, "randaugment: magnitude bin, in [0, --policy-bins) (torchvision's magnitude).")
    policy_bins: int = _field(31, "randaugment and trivialaugment: number of magnitude bins (num_magnitude_bins).")
    interpolation: str = _field(
        "nearest",
        "Sampling of the geometric ops of --policy and --affine-* (torchvision's default: nearest).",
        choices=INTERPOLATIONS,
    )
    affine_degrees: float = _field(0.0, "Random affine: rotation uniform in [-D, D] degrees, in [0, 180]; 0 = none.")
    affine_translate: float = _field(
        0.0, "Random affine: shift uniform in [-T, T] times the image size (rounded to pixels), in [0, 1)."
    )
    affine_scale: float = _field(0.0, "Random affine: scale uniform in [1 - S, 1 + S], in [0, 1).")
    affine_shear: float = _field(0.0, "Random affine: x shear uniform in [-D, D] degrees, in [0, 60].")
    affine_prob: float = _field(
        1.0, "Random affine (with any --affine-* above 0): probability per image, in [0, 1]; black outside."
    )
    random_erasing: float = _field(
        0.0,
        "Random erasing (torchvision's RandomErasing: a box of 0.02-0.33 of the image, aspect ratio 0.3-3.3): "
        "probability per image, in [0, 1]; 0 = off.",
    )
    random_erasing_fill: str = _field(
        "black",
        "Random erasing's value: black (torchvision on uint8 images) or mean (the dataset mean, as torchvision's "
        "value=0 after Normalize).",
        choices=FILLS,
    )
    coarse_dropout: float = _field(
        0.0, "Coarse dropout (holes filled with the dataset mean): probability per image, in [0, 1]; 0 = off."
    )
    coarse_dropout_holes: tuple[int, ...] = _field(
        (1, 1), "Coarse dropout: MIN MAX number of holes per image.", metavar="N"
    )
    coarse_dropout_size: tuple[int, ...] = _field(
        (16, 16), "Coarse dropout: MIN MAX side of a hole in pixels (height and width drawn apart).", metavar="PX"
    )
    # Optimization.
    epochs: int = _field(20, "Number of training epochs.")
    batch_size: int = _field(512, "Training batch size (the last partial batch of each epoch is dropped).")
    eval_batch_size: int = _field(1000, "Evaluation batch size (the last batch is padded and masked).")
    optimizer: str = _field("sgd", "Optimizer (optax).", choices=OPTIMIZERS)
    lr: float | str = _field(
        0.4,
        "Peak learning rate (the max LR of onecycle, the initial LR of the others); 'auto' runs the LR range "
        "test first (python -m jaxcifar.lr_find) and uses its suggestion. Alias: --max-lr.",
        parse="lr",
    )
    momentum: float = _field(0.9, "SGD momentum, or Adam/AdamW beta1.")
    nesterov: bool = _field(True, "SGD: Nesterov momentum (--no-nesterov turns it off).")
    weight_decay: float = _field(
        5e-4,
        "Weight decay on all parameters. sgd and adam: coupled L2 added to the gradient, as PyTorch's "
        "SGD/Adam weight_decay; adamw: decoupled, multiplied by the LR, as PyTorch's AdamW.",
    )
    decoupled_weight_decay: bool = _field(
        False,
        "sgd/adam: --weight-decay counts per 1024 examples, decoupled from --lr and --momentum (airbench): each "
        "step decays the weights by about weight_decay x batch_size / 1024 x the schedule's relative LR.",
    )
    bn_bias_lr_mult: float = _field(
        1.0,
        "BatchNorm biases train at this multiple of the LR (their weight decay divided by it, so the decay per "
        "step is unchanged); airbench uses 64.",
    )
    muon_lr: float = _field(
        0.0,
        "Muon (optax.contrib.muon) for the convolution kernels at this peak LR, following the schedule's shape: "
        "Nesterov momentum --muon-momentum, the update orthogonalized by 3 Newton-Schulz steps, no weight decay "
        "(airbench94_muon); the other parameters keep --optimizer. 0 = off.",
    )
    muon_momentum: float = _field(0.6, "Muon's momentum (with --muon-lr).")
    muon_normalize: bool = _field(
        True,
        "With --muon-lr: before each update, scale every kernel to Frobenius norm sqrt(C_out), as airbench94_muon's "
        "Muon does (--no-muon-normalize: optax's Muon alone).",
    )
    whiten_bias_epochs: int = _field(
        3,
        "airbench: epochs during which the whitening convolution's bias trains (its filters never do); later "
        "epochs skip the whitening layer's backward.",
    )
    whiten_bias_lr_mult: float = _field(
        1.0,
        "airbench: the whitening bias trains at this multiple of the LR (its weight decay divided by it, so the "
        "decay per step is unchanged); airbench94_muon uses --bn-bias-lr-mult's value, airbench94 1.",
    )
    whiten_bias_decay: bool = _field(
        False,
        "airbench: the whitening bias's LR falls linearly from its peak to 0 over --whiten-bias-epochs "
        "(airbench94_muon) instead of following --schedule until then.",
    )
    grad_clip: float = _field(0.0, "Clip gradients to this global L2 norm before weight decay; 0 = off.")
    label_smoothing: float = _field(0.0, "Label smoothing of the cross-entropy, in [0, 1).")
    schedule: str = _field(
        "onecycle",
        "LR schedule, stepped per batch: onecycle (PyTorch OneCycleLR, cosine), linear-onecycle (piecewise "
        "linear: lr / div-factor -> lr at pct-start -> lr / (div-factor x final-div-factor) at the end, as Page's "
        "ResNet-9 and airbench), cosine (to 0), multistep "
        "(x gamma at each milestone epoch), warmup-cosine (linear warm-up then cosine to 0), linear (from lr "
        "straight down to 0 at the last step, as airbench94_muon), constant.",
        choices=SCHEDULES,
    )
    pct_start: float = _field(0.3, "onecycle, linear-onecycle: fraction of the steps spent increasing the LR.")
    div_factor: float = _field(25.0, "onecycle, linear-onecycle: initial LR = lr / div_factor.")
    final_div_factor: float = _field(1e4, "onecycle, linear-onecycle: final LR = initial LR / final_div_factor.")
    milestones: tuple[int, ...] = _field((10, 15), "multistep: epochs at which the LR is multiplied by gamma.")
    gamma: float = _field(0.1, "multistep: LR factor at each milestone.")
    warmup_epochs: float = _field(1.0, "warmup-cosine: epochs of linear warm-up from 0.")
    # Advanced training policies (all off by default).
    ema_decay: float | None = _field(
        None,
        "Keep an exponential moving average of the weights (and BatchNorm statistics) with this decay, in "
        "[0, 1), e.g. 0.999; evaluation, the best checkpoint and the report then use the EMA weights.",
    )
    lookahead_every: int = _field(
        0,
        "Lookahead weight averaging (airbench): every this many steps the slow weights (and BatchNorm statistics) "
        "move to decay * slow + (1 - decay) * current and the current ones are reset to them; at the last step "
        "the run ends on the slow weights. 0 = off; airbench uses 5.",
    )
    lookahead_decay: float = _field(
        0.95**5, "Lookahead: decay at the last step; at step t of T it is lookahead_decay x (t / T)^3 (airbench)."
    )
    mixup_alpha: float = _field(0.0, "MixUp: lambda ~ Beta(alpha, alpha), e.g. 0.2; 0 = off.")
    cutmix_alpha: float = _field(0.0, "CutMix: lambda ~ Beta(alpha, alpha), e.g. 1.0; 0 = off (both on: 50/50).")
    mix_prob: float = _field(1.0, "Probability that a batch is mixed (MixUp/CutMix), in [0, 1].")
    mix_off_epoch: int = _field(0, "Stop MixUp/CutMix for the last this many epochs.")
    tta: str = _field(
        "none",
        "Test-time augmentation at evaluation: flip (original + mirror) or flip-translate (+ four 1-px shifts), "
        "softmax averaged over the views; multi-crop (airbench: original, mirror, and both shifted 1 px up-left "
        "and down-right with reflect padding; logits weighted 1/4, 1/4 and 1/8 each).",
        choices=TTA_MODES,
    )
    tta_final_only: bool = _field(
        False,
        "With --tta: evaluate every epoch but the last on the plain images and only the last with the TTA views "
        "(airbench's practice; multi-crop evaluates 6 views, on a CPU 6x a plain evaluation's time). The "
        "history's tta key marks the epochs evaluated with TTA; the best checkpoint is chosen on plain accuracy.",
    )
    cycle_momentum: bool = _field(
        False,
        "onecycle: cycle SGD momentum (Adam beta1) inversely to the LR between --max-momentum and "
        "--base-momentum, as PyTorch OneCycleLR(cycle_momentum=True); replaces --momentum.",
    )
    base_momentum: float = _field(0.85, "Momentum at the LR peak with --cycle-momentum.")
    max_momentum: float = _field(0.95, "Momentum at the start and end with --cycle-momentum.")
    lr_find_start: float = _field(1e-7, "LR range test: first learning rate.")
    lr_find_end: float = _field(10.0, "LR range test: last learning rate (reached exponentially).")
    lr_find_steps: int = _field(100, "LR range test: number of steps (stops early when the loss diverges).")
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
    async_checkpoints: bool = _field(
        True,
        "Write each epoch's checkpoint in the background while the next epoch trains (the run waits only "
        "before the next save and at the end; history.json lists an epoch once its checkpoint is committed); "
        "--no-async-checkpoints writes it before going on.",
    )
    log_every: int = _field(20, "Refresh the progress bar's loss/acc every this many steps.")
    compile_cache: bool = _field(
        True,
        "Keep compiled steps in a persistent XLA compilation cache ($JAXCIFAR_CACHE_DIR/xla, default "
        "~/.cache/jaxcifar/xla; JAX_COMPILATION_CACHE_DIR wins when set), so a re-run of the same configuration "
        "loads them instead of compiling (--no-compile-cache turns it off).",
    )
    folder_cache: bool = _field(
        True,
        "--data-source folder: keep the decoded images in a cache ($JAXCIFAR_CACHE_DIR/folders, default "
        "~/.cache/jaxcifar/folders; keyed by the folder's file names, sizes and modification times, so a changed "
        "folder is decoded again), so a re-run loads them in about a second instead of decoding every JPEG "
        "(--no-folder-cache neither reads nor writes it).",
    )
    report: bool = _field(
        False,
        "After training, write curves, misclassified and Grad-CAM galleries (the model's Grad-CAM layer), the "
        "confusion matrix and report.json into --workdir (as python -m jaxcifar.report) and log the pictures to "
        "TensorBoard.",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _checked_type(f.name, str(f.type), getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            allowed = f.metadata.get("choices")
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{flag(f.name)}: {value!r} is not one of {', '.join(allowed)}")
        _check(0 <= self.seed <= MAX_SEED, "seed", f"must be in [0, {MAX_SEED}]")
        _check(self.workdir.strip() != "", "workdir", "must not be empty")
        _check(self.width >= 1, "width", "must be >= 1")
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        _check(self.train_subset is None or self.train_subset >= 1, "train_subset", "must be >= 1")
        _check(self.test_subset is None or self.test_subset >= 1, "test_subset", "must be >= 1")
        _check(self.lr == "auto" or (isinstance(self.lr, int | float) and self.lr > 0), "lr", "must be > 0 or auto")
        _check(self.ema_decay is None or 0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        _check(self.mixup_alpha >= 0, "mixup_alpha", "must be >= 0 (0 = off)")
        _check(self.cutmix_alpha >= 0, "cutmix_alpha", "must be >= 0 (0 = off)")
        _check(0.0 <= self.mix_prob <= 1.0, "mix_prob", "must be in [0, 1]")
        _check(0 <= self.mix_off_epoch <= self.epochs, "mix_off_epoch", "must be in [0, --epochs]")
        _check(0.0 <= self.base_momentum < self.max_momentum < 1.0, "base_momentum", "< --max-momentum < 1 required")
        _check(not self.cycle_momentum or self.schedule == "onecycle", "cycle_momentum", "needs --schedule onecycle")
        _check(0 < self.lr_find_start < self.lr_find_end, "lr_find_start", "must be > 0 and < --lr-find-end")
        _check(self.lr_find_steps >= 5, "lr_find_steps", "must be >= 5")
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
        _check(0 <= self.crop_padding <= 16, "crop_padding", "must be in [0, 16]")
        _check(self.bn_bias_lr_mult > 0, "bn_bias_lr_mult", "must be > 0")
        _check(self.whiten_bias_epochs >= 0, "whiten_bias_epochs", "must be >= 0")
        _check(self.whiten_bias_lr_mult > 0, "whiten_bias_lr_mult", "must be > 0")
        _check(self.muon_lr >= 0, "muon_lr", "must be >= 0 (0 = off)")
        _check(0.0 <= self.muon_momentum < 1.0, "muon_momentum", "must be in [0, 1)")
        _check(self.lookahead_every >= 0, "lookahead_every", "must be >= 0 (0 = off)")
        _check(0.0 <= self.lookahead_decay < 1.0, "lookahead_decay", "must be in [0, 1)")
        _check(not self.tta_final_only or self.tta != "none", "tta_final_only", "needs a --tta other than none")
        _check(
            not self.alternating_flip or self.augment != "none",
            "alternating_flip",
            "needs an --augment that flips (flip, crop-flip, crop-flip-cutout)",
        )
        _check(
            not self.decoupled_weight_decay or self.optimizer in ("sgd", "adam"),
            "decoupled_weight_decay",
            "needs --optimizer sgd or adam (adamw decouples its own way)",
        )
        _check(
            not self.decoupled_weight_decay or self.lr != "auto",
            "decoupled_weight_decay",
            "needs a numeric --lr (the decay per step is computed from it)",
        )
        _check(
            self.muon_lr == 0 or self.lr != "auto",
            "muon_lr",
            "needs a numeric --lr (Muon follows the schedule's LR relative to its peak)",
        )
        _check(
            not self.whiten_bias_decay or self.lr != "auto",
            "whiten_bias_decay",
            "needs a numeric --lr (the whitening bias's LR falls from the peak LR)",
        )
        _check(self.policy_bins >= 2, "policy_bins", "must be >= 2")
        _check(0 <= self.randaugment_m < self.policy_bins, "randaugment_m", "must be in [0, --policy-bins)")
        _check(0 <= self.randaugment_n <= 16, "randaugment_n", "must be in [0, 16]")
        _check(0.0 <= self.affine_degrees <= 180.0, "affine_degrees", "must be in [0, 180]")
        _check(0.0 <= self.affine_translate < 1.0, "affine_translate", "must be in [0, 1)")
        _check(0.0 <= self.affine_scale < 1.0, "affine_scale", "must be in [0, 1)")
        _check(0.0 <= self.affine_shear <= 60.0, "affine_shear", "must be in [0, 60]")
        for name in ("affine_prob", "random_erasing", "coarse_dropout"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        for name, most in (("coarse_dropout_holes", 64), ("coarse_dropout_size", 32)):
            low_high = getattr(self, name)
            ok = len(low_high) == 2 and 1 <= low_high[0] <= low_high[1] <= most
            _check(ok, name, f"must be two integers MIN MAX with 1 <= MIN <= MAX <= {most}")
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
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """Builds a Config from ``to_dict`` output; unknown keys raise ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Writes the config as JSON to ``path`` (atomically)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Reads a config written by ``save``; ConfigError naming the file and the key when it is bad."""
        data = read_json(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of config keys, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def flag(name: str) -> str:
    """Returns the CLI flag of a config field: ``train_subset`` -> ``--train-subset``."""
    return "--" + name.replace("_", "-")


MAX_SEED = 2**32 - 1  # numpy and jax.random both take seeds up to this

_TYPE_NAMES = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


def _checked_type(name: str, annotation: str, value: Any) -> Any:
    """Returns ``value`` if it has the field's type (ints are accepted for floats and become floats,
    lists for tuples); raises ConfigError naming the flag, what is allowed and what was given."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    if annotation.startswith("tuple"):
        if isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ConfigError(f"{flag(name)}: expected a list of integers, got {value!r}")
    for kind in kinds:
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{flag(name)}: must be a finite number, got {value}")
            return float(value)
        if kind == "str" and isinstance(value, str):
            return value
    allowed = " or ".join(_TYPE_NAMES[k] for k in kinds if k in _TYPE_NAMES)
    if name == "lr":
        allowed = "a finite number or auto"
    raise ConfigError(f"{flag(name)}: expected {allowed}, got {value!r} ({type(value).__name__})")


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{flag(name)} {what}")
