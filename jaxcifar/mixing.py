"""MixUp and CutMix on the device, inside the jitted train step (one lambda per batch, as timm).

Each image is mixed with its mirror in the batch (``images[::-1]``); the targets are the matching
convex combination of the (label-smoothed) one-hot labels. With probability ``1 - prob``, or once
``step >= until_step`` (the last ``--mix-off-epoch`` epochs), the batch passes through unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixSpec:
    """Static mixing settings: Beta(alpha, alpha) for MixUp and CutMix (0 = that method off)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    until_step: int = 2**31 - 1

    @property
    def enabled(self) -> bool:
        """True when MixUp or CutMix can happen at all."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """A random box covering about ``1 - lam`` of the image (clipped at the borders, as timm's rand_bbox).

    Returns (mask bool (height, width) True inside the box, the box's exact area fraction float32).
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
    cy, cx = jax.random.randint(rng, (2,), 0, jnp.array([height, width]))
    y1, y2 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x1, x2 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    mask = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    return mask, ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (height * width)


NO_MIX = MixSpec()


def mix_targets(targets: jax.Array, lam: jax.Array) -> jax.Array:
    """Soft targets (B, num_classes) of a batch mixed by ``mix_batch``: ``lam * t + (1 - lam) * t[::-1]``.

    Rows still sum to 1 when the inputs' rows do.
    """
    return lam * targets + (1.0 - lam) * targets[::-1]


def mix_batch(rng: jax.Array, images: jax.Array, step: jax.Array, spec: MixSpec) -> tuple[jax.Array, jax.Array]:
    """Mixes a normalized float batch (B, H, W, C) with its mirror ``images[::-1]``.

    Returns (images, lam): lam, a float32 scalar, is the weight of the original images (1 = no
    mixing; for CutMix the exact fraction of pixels kept); mix the targets with ``mix_targets``.
    """
    if not spec.enabled:
        return images, jnp.float32(1.0)
    apply_key, choose_key, mixup_key, cutmix_key, box_key = jax.random.split(rng, 5)
    active = (step < spec.until_step) & jax.random.bernoulli(apply_key, spec.prob)
    use_cutmix = jnp.bool_(spec.cutmix_alpha > 0)
    if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(choose_key, 0.5)
    mixup_lam = _symmetric_beta(mixup_key, spec.mixup_alpha)
    cutmix_lam = _symmetric_beta(cutmix_key, spec.cutmix_alpha)
    partner = images[::-1]
    box, box_area = cutmix_box(box_key, cutmix_lam, images.shape[1], images.shape[2])
    box = box & active & use_cutmix
    lam = jnp.where(use_cutmix, 1.0 - box_area, mixup_lam)
    lam = jnp.where(active, lam, 1.0).astype(jnp.float32)
    blended = jnp.where(use_cutmix, images, lam * images + (1.0 - lam) * partner)
    mixed = jnp.where(box[None, :, :, None], partner, blended)
    return mixed.astype(images.dtype), lam


def _symmetric_beta(rng: jax.Array, alpha: float) -> jax.Array:
    """One Beta(alpha, alpha) sample as a float32 scalar; 1.0 (no mixing) when alpha is 0."""
    if alpha <= 0:
        return jnp.float32(1.0)
    return jax.random.beta(rng, alpha, alpha).astype(jnp.float32)
