"""Batched on-device augmentation and normalization, all jit-able.

Images arrive as uint8 (B, H, W, C). Augmentations act on the raw pixels (zero padding is black,
as torchvision's ``RandomCrop(32, padding=4)``), normalization comes last and returns float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


# Training augmentations (``Config.augment``, ``--augment``), in ``augment``'s words.
AUGMENT_MODES = ("none", "flip", "crop-flip", "crop-flip-cutout")


def augment(rng: jax.Array, images: jax.Array, mode: str, cutout_size: int = 8) -> jax.Array:
    """Applies the augmentation ``mode`` (one of ``AUGMENT_MODES``) to a uint8 batch.

    Returns the augmented batch, same shape and dtype. Raises ValueError naming the modes for any other ``mode``.
    """
    if mode not in AUGMENT_MODES:
        raise ValueError(f"unknown augmentation {mode!r}; one of {', '.join(AUGMENT_MODES)}")
    if mode == "none":
        return images
    crop_key, flip_key, cutout_key = jax.random.split(rng, 3)
    if mode in ("crop-flip", "crop-flip-cutout"):
        images = random_crop(crop_key, images)
    images = random_flip(flip_key, images)
    if mode == "crop-flip-cutout":
        images = cutout(cutout_key, images, cutout_size)
    return images


def _original(images: jax.Array) -> jax.Array:
    return images


def _mirror(images: jax.Array) -> jax.Array:
    return images[:, :, ::-1, :]


def _translate(dy: int, dx: int) -> Callable[[jax.Array], jax.Array]:
    """The view shifted by ``(1 - dy, 1 - dx)`` pixels, zero-filled at the edge (dy, dx in {0, 1, 2})."""

    def view(images: jax.Array) -> jax.Array:
        h, w = images.shape[1:3]
        padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return padded[:, dy : dy + h, dx : dx + w, :]

    return view


# Test-time augmentation (``Config.tta``, ``--tta``): each mode's views, in stacking order. The one table
# that ``TTA_MODES``, ``tta_view_count`` and ``tta_views`` all read.
_TTA_VIEWS: dict[str, tuple[Callable[[jax.Array], jax.Array], ...]] = {
    "none": (_original,),
    "flip": (_original, _mirror),
    "flip-translate": (_original, _mirror, *(_translate(dy, dx) for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)))),
}
TTA_MODES = tuple(_TTA_VIEWS)


def _tta_view_fns(mode: str) -> tuple[Callable[[jax.Array], jax.Array], ...]:
    if mode not in _TTA_VIEWS:
        raise ValueError(f"unknown TTA mode {mode!r}; one of {', '.join(TTA_MODES)}")
    return _TTA_VIEWS[mode]


def tta_view_count(mode: str) -> int:
    """Returns how many views ``tta_views(images, mode)`` stacks (V). Raises ValueError for an unknown mode."""
    return len(_tta_view_fns(mode))


def tta_views(images: jax.Array, mode: str) -> jax.Array:
    """Test-time views of a batch (B, H, W, C), stacked as (V, B, H, W, C) (V = ``tta_view_count(mode)``).

    ``none``: the batch (V=1); ``flip``: + the mirror (V=2); ``flip-translate``: + the four 1-pixel
    translations of the original (zero-filled edge; V=6). Raises ValueError for a mode not in ``TTA_MODES``.
    """
    return jnp.stack([view(images) for view in _tta_view_fns(mode)])
