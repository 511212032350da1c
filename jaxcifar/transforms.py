"""Batched on-device augmentation and normalization, all jit-able.

Images arrive as uint8 (B, H, W, C). Augmentations act on the raw pixels (zero padding is black,
as torchvision's ``RandomCrop(32, padding=4)``), normalization comes last and returns float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Returns ``(images / 255 - mean) / std`` as float32 (B, H, W, C)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def denormalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Inverse of ``normalize``: returns float32 images in [0, 1] (clipped), same shape."""
    x = images * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
    return jnp.clip(x, 0.0, 1.0)


def random_crop(rng: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """Zero-pads by ``padding`` pixels and takes a random crop of the original size per image.

    Returns the same shape and dtype as ``images`` (B, H, W, C).
    """
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2. Returns the same shape and dtype."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def cutout(rng: jax.Array, images: jax.Array, size: int) -> jax.Array:
    """Zeroes a ``size x size`` square (clipped at the border) at a uniform random center per image.

    Returns the same shape and dtype (DeVries & Taylor, 2017).
    """
    b, h, w, _ = images.shape
    center = jax.random.randint(rng, (b, 2), 0, jnp.array([h, w]))
    top, left = center[:, 0] - size // 2, center[:, 1] - size // 2
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
    mask = in_rows[:, :, None] & in_cols[:, None, :]
    return jnp.where(mask[..., None], jnp.zeros((), images.dtype), images)


def augment(rng: jax.Array, images: jax.Array, mode: str, cutout_size: int = 8) -> jax.Array:
    """Applies the augmentation ``mode`` (see ``config.AUGMENTS``) to a uint8 batch, same shape/dtype."""
    crop_key, flip_key, cutout_key = jax.random.split(rng, 3)
    if mode == "none":
        return images
    if mode in ("crop-flip", "crop-flip-cutout"):
        images = random_crop(crop_key, images)
    images = random_flip(flip_key, images)
    if mode == "crop-flip-cutout":
        images = cutout(cutout_key, images, cutout_size)
    return images


TTA_MODES = ("none", "flip", "flip-translate")


def tta_views(images: jax.Array, mode: str) -> jax.Array:
    """Test-time views of a batch (B, H, W, C), stacked as (V, B, H, W, C).

    ``none``: the batch (V=1); ``flip``: + the mirror (V=2); ``flip-translate``: + the four 1-pixel
    translations of the original (zero-filled edge; V=6).
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; one of {', '.join(TTA_MODES)}")
    views = [images]
    if mode in ("flip", "flip-translate"):
        views.append(images[:, :, ::-1, :])
    if mode == "flip-translate":
        padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
        h, w = images.shape[1:3]
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            views.append(padded[:, dy : dy + h, dx : dx + w, :])
    return jnp.stack(views)
