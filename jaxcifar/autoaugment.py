"""Auto-augment policies on the device, as torchvision defines them: AutoAugment's CIFAR-10 policy,
RandAugment and TrivialAugmentWide (``torchvision.transforms.v2._auto_augment``, 0.29).

A policy draws, per image, a few steps of (op, signed magnitude) (``sample``), and ``augment_ops.apply_op``
applies them one step after the other (``apply``); both run inside the jitted train step. The draws follow
torchvision's: AutoAugment picks one of its 25 sub-policies uniformly, and applies each of its two ops with
the op's probability at the op's magnitude bin (of 10); RandAugment applies ``num_ops`` ops drawn uniformly
from its 14 (Identity included) at bin ``magnitude`` (of ``bins``); TrivialAugmentWide applies one op
drawn uniformly from its 14 at a uniform bin (of ``bins``). Signed magnitudes are negated with
probability 1/2. The magnitude tables are torchvision's, for 32x32 images.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar import augment_ops
from jaxcifar.augment_ops import OP_INDEX, OP_NAMES
from jaxcifar.names import POLICIES

AUTOAUGMENT_BINS = 10
IMAGE_SIZE = 32  # the translate magnitudes depend on it (CIFAR's 32x32)


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 (steps,): ``torch.linspace(start, end, steps)`` on CPU value for value: a float32 step, the
    first half ``start + step * i`` and the second ``end - step * (steps - 1 - i)``, each a fused
    multiply-add (one rounding; here the exact product in float64, then rounded to float32)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(max(steps - 1, 1))
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(start32) + np.float64(step) * i
    high = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def _posterize_bits(bins: int, spread: int) -> np.ndarray:
    """``(8 - arange(bins) / ((bins - 1) / spread)).round().int()`` as float32 (round half to even)."""
    return np.round(np.float32(8) - np.arange(bins, dtype=np.float32) / np.float32((bins - 1) / spread))


def _table(ranges: dict[str, np.ndarray | None], bins: int) -> tuple[tuple[str, ...], np.ndarray]:
    """(the space's op names, float32 (len(OP_NAMES), bins) magnitudes; 0 for ops without magnitude)."""
    table = np.zeros((len(OP_NAMES), bins), np.float32)
    for name, values in ranges.items():
        if values is not None:
            table[OP_INDEX[name]] = values
    return tuple(ranges), table


def autoaugment_space(bins: int = AUTOAUGMENT_BINS, size: int = IMAGE_SIZE) -> tuple[tuple[str, ...], np.ndarray]:
    """AutoAugment's (and RandAugment's, with Identity and without Invert) ops and magnitudes."""
    colour = torch_linspace(0.0, 0.9, bins)
    return _table(
        {
            "ShearX": torch_linspace(0.0, 0.3, bins),
            "ShearY": torch_linspace(0.0, 0.3, bins),
            "TranslateX": torch_linspace(0.0, 150.0 / 331.0 * size, bins),
            "TranslateY": torch_linspace(0.0, 150.0 / 331.0 * size, bins),
            "Rotate": torch_linspace(0.0, 30.0, bins),
            "Brightness": colour,
            "Color": colour,
            "Contrast": colour,
            "Sharpness": colour,
            "Posterize": _posterize_bits(bins, 4),
            "Solarize": torch_linspace(1.0, 0.0, bins),
            "AutoContrast": None,
            "Equalize": None,
            "Invert": None,
        },
        bins,
    )


def randaugment_space(bins: int = 31, size: int = IMAGE_SIZE) -> tuple[tuple[str, ...], np.ndarray]:
    """RandAugment's 14 ops (Identity, AutoAugment's without Invert) and their magnitudes."""
    names, table = autoaugment_space(bins, size)
    return ("Identity", *(n for n in names if n != "Invert")), table


def trivialaugment_space(bins: int = 31) -> tuple[tuple[str, ...], np.ndarray]:
    """TrivialAugmentWide's 14 ops and their (wide) magnitudes."""
    colour = torch_linspace(0.0, 0.99, bins)
    return _table(
        {
            "Identity": None,
            "ShearX": torch_linspace(0.0, 0.99, bins),
            "ShearY": torch_linspace(0.0, 0.99, bins),
            "TranslateX": torch_linspace(0.0, 32.0, bins),
            "TranslateY": torch_linspace(0.0, 32.0, bins),
            "Rotate": torch_linspace(0.0, 135.0, bins),
            "Brightness": colour,
            "Color": colour,
            "Contrast": colour,
            "Sharpness": colour,
            "Posterize": _posterize_bits(bins, 6),
            "Solarize": torch_linspace(1.0, 0.0, bins),
            "AutoContrast": None,
            "Equalize": None,
        },
        bins,
    )


# Ops whose magnitude is negated with probability 1/2 (torchvision's ``signed``).
SIGNED_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
_SIGNED = np.array([name in SIGNED_OPS for name in OP_NAMES])

# AutoAugment's CIFAR-10 policy: 25 sub-policies of two (op, probability, magnitude bin or None).
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """Static settings of an auto-augment policy (hashable: the jitted step closes over it).

    ``name`` one of ``POLICIES``; RandAugment: ``num_ops`` ops at bin ``magnitude`` of ``bins``;
    TrivialAugmentWide: ``bins``; geometric ops sample with ``interpolation`` and fill outside the image
    with ``fill`` (None: black, as torchvision's default).
    """

    name: str = "none"
    num_ops: int = 2
    magnitude: int = 9
    bins: int = 31
    interpolation: str = "nearest"
    fill: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; one of {', '.join(POLICIES)}")
        if self.bins < 2 or not 0 <= self.magnitude < self.bins or self.num_ops < 0:
            raise ValueError(f"policy needs bins >= 2, 0 <= magnitude < bins, num_ops >= 0; got {self}")

    @property
    def steps(self) -> int:
        """How many (op, magnitude) steps each image gets (S)."""
        return {"none": 0, "autoaugment": 2, "randaugment": self.num_ops, "trivialaugment": 1}[self.name]


NO_POLICY = PolicySpec()


def _signed(key: jax.Array, ops: jax.Array, magnitudes: jax.Array) -> jax.Array:
    negate = jax.random.bernoulli(key, 0.5, ops.shape) & jnp.asarray(_SIGNED)[ops]
    return jnp.where(negate, -magnitudes, magnitudes)


def _space_indices(names: tuple[str, ...]) -> jax.Array:
    return jnp.array([OP_INDEX[n] for n in names], jnp.int32)


def sample(rng: jax.Array, batch: int, spec: PolicySpec) -> tuple[jax.Array, jax.Array]:
    """Draws each image's steps of ``spec``'s policy.

    Returns (ops int32 (batch, S) indices into ``OP_NAMES``, magnitudes float32 (batch, S) signed, in
    ``augment_ops.apply_op``'s convention); a step that is not applied is Identity with magnitude 0.
    """
    steps = spec.steps
    op_key, bin_key, apply_key, sign_key = jax.random.split(rng, 4)
    if spec.name == "autoaugment":
        _, table = autoaugment_space()
        sub_ops = jnp.array([[OP_INDEX[n] for n, _, _ in sub] for sub in CIFAR10_POLICY], jnp.int32)
        sub_probs = jnp.array([[p for _, p, _ in sub] for sub in CIFAR10_POLICY], jnp.float32)
        sub_bins = jnp.array([[b or 0 for _, _, b in sub] for sub in CIFAR10_POLICY], jnp.int32)
        chosen = jax.random.randint(op_key, (batch,), 0, len(CIFAR10_POLICY))
        ops, bins = sub_ops[chosen], sub_bins[chosen]
        applied = jax.random.uniform(apply_key, (batch, steps)) < sub_probs[chosen]
        ops = jnp.where(applied, ops, OP_INDEX["Identity"])
    elif spec.name in ("randaugment", "trivialaugment"):
        if spec.name == "randaugment":
            names, table = randaugment_space(spec.bins)
            bins = jnp.full((batch, steps), spec.magnitude, jnp.int32)
        else:
            names, table = trivialaugment_space(spec.bins)
            bins = jax.random.randint(bin_key, (batch, steps), 0, spec.bins)
        ops = _space_indices(names)[jax.random.randint(op_key, (batch, steps), 0, len(names))]
    else:
        return jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0), jnp.float32)
    magnitudes = jnp.asarray(table)[ops, bins]
    return ops, _signed(sign_key, ops, magnitudes)


def apply(images: jax.Array, ops: jax.Array, magnitudes: jax.Array, spec: PolicySpec = NO_POLICY) -> jax.Array:
    """Applies each image's steps (``sample``'s output, (B, S)) in order. Returns uint8 (B, H, W, C)."""
    if ops.shape[1] == 0:
        return images

    def step(batch: jax.Array, op_and_magnitude: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        return augment_ops.apply_op(batch, *op_and_magnitude, spec.interpolation, spec.fill), None

    return jax.lax.scan(step, images, (ops.T, magnitudes.T))[0]  # one compiled op body for all S steps


def augment(rng: jax.Array, images: jax.Array, spec: PolicySpec) -> jax.Array:
    """``spec``'s policy on a uint8 batch (B, H, W, C): ``apply(images, *sample(...))``. Returns uint8, same shape."""
    if spec.steps == 0:
        return images
    ops, magnitudes = sample(rng, images.shape[0], spec)
    return apply(images, ops, magnitudes, spec)
