"""The train step's whole augmentation, on the device: what ``Config`` asks for, in one fixed order.

1. ``--augment``: random crop of the zero-padded image and horizontal flip (``transforms.augment``);
2. ``--affine-*``: a random affine (torchvision's ``RandomAffine``);
3. ``--policy``: AutoAugment (CIFAR-10), RandAugment or TrivialAugmentWide (``jaxcifar.autoaugment``);
4. ``--augment crop-flip-cutout``: cutout;
5. ``--random-erasing``: torchvision's ``RandomErasing``;
6. ``--coarse-dropout``: holes filled with the dataset mean.

All act on uint8 images before normalization; MixUp/CutMix (``jaxcifar.mixing``) come after it. Without
any of 2, 3, 5, 6 the batch goes through ``transforms.augment`` alone, exactly as before they existed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from jaxcifar import augment_ops, autoaugment, transforms
from jaxcifar.autoaugment import NO_POLICY, PolicySpec


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Static augmentation settings of the train step (hashable). Probabilities 0 turn a stage off."""

    mode: str = "crop-flip"
    cutout_size: int = 8
    crop_padding: int = 4
    pad_mode: str = "zeros"
    policy: PolicySpec = NO_POLICY
    affine_degrees: float = 0.0
    affine_translate: float = 0.0
    affine_scale: float = 0.0
    affine_shear: float = 0.0
    affine_prob: float = 1.0
    interpolation: str = "nearest"
    random_erasing: float = 0.0
    random_erasing_fill: str = "black"
    coarse_dropout: float = 0.0
    coarse_dropout_holes: tuple[int, int] = (1, 1)
    coarse_dropout_size: tuple[int, int] = (16, 16)

    @property
    def affine_enabled(self) -> bool:
        """True when the random affine can change an image."""
        moves = self.affine_degrees or self.affine_translate or self.affine_scale or self.affine_shear
        return bool(moves) and self.affine_prob > 0

    @classmethod
    def from_config(cls, config: Any) -> AugmentSpec:
        """The settings of a run's ``jaxcifar.config.Config`` (not imported here: config imports this module)."""
        return cls(
            mode=config.augment,
            cutout_size=config.cutout_size,
            crop_padding=config.crop_padding,
            pad_mode=config.pad_mode,
            policy=PolicySpec(
                config.policy,
                num_ops=config.randaugment_n,
                magnitude=config.randaugment_m,
                bins=config.policy_bins,
                interpolation=config.interpolation,
            ),
            affine_degrees=config.affine_degrees,
            affine_translate=config.affine_translate,
            affine_scale=config.affine_scale,
            affine_shear=config.affine_shear,
            affine_prob=config.affine_prob,
            interpolation=config.interpolation,
            random_erasing=config.random_erasing,
            random_erasing_fill=config.random_erasing_fill,
            coarse_dropout=config.coarse_dropout,
            coarse_dropout_holes=tuple(config.coarse_dropout_holes),
            coarse_dropout_size=tuple(config.coarse_dropout_size),
        )


def mean_levels(mean: Sequence[float]) -> tuple[float, ...]:
    """The dataset mean (per channel, in [0, 1]) as uint8 levels, rounded."""
    return tuple(float(round(m * 255)) for m in mean)


def augment_batch(
    rng: jax.Array, images: jax.Array, spec: AugmentSpec, mean: Sequence[float], flip: jax.Array | None = None
) -> jax.Array:
    """``spec``'s augmentation of a uint8 batch (B, H, W, C) in the module's order; ``mean`` (per channel,
    in [0, 1]) fills the ``mean`` fills and coarse dropout's holes; ``flip`` (bool (B,)) replaces the flip's
    coins when given (``transforms.alternating_flip``). Returns uint8, same shape."""
    extras = spec.affine_enabled or spec.policy.steps or spec.random_erasing or spec.coarse_dropout
    if not extras:
        return transforms.augment(rng, images, spec.mode, spec.cutout_size, spec.crop_padding, spec.pad_mode, flip)
    cutout = spec.mode == "crop-flip-cutout"
    mode = "crop-flip" if cutout else spec.mode
    images = transforms.augment(rng, images, mode, spec.cutout_size, spec.crop_padding, spec.pad_mode, flip)
    affine_key, policy_key, erasing_key, dropout_key = (jax.random.fold_in(rng, 2 + i) for i in range(4))
    if spec.affine_enabled:
        images = augment_ops.random_affine(
            affine_key,
            images,
            spec.affine_degrees,
            spec.affine_translate,
            spec.affine_scale,
            spec.affine_shear,
            spec.affine_prob,
            spec.interpolation,
        )
    images = autoaugment.augment(policy_key, images, spec.policy)
    if cutout:
        images = transforms.cutout(jax.random.split(rng, 3)[2], images, spec.cutout_size)
    if spec.random_erasing:
        value = mean_levels(mean) if spec.random_erasing_fill == "mean" else 0.0
        images = augment_ops.random_erasing(erasing_key, images, spec.random_erasing, value=value)
    if spec.coarse_dropout:
        images = augment_ops.coarse_dropout(
            dropout_key,
            images,
            spec.coarse_dropout,
            spec.coarse_dropout_holes,
            spec.coarse_dropout_size,
            mean_levels(mean),
        )
    return images
