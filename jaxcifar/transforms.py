"""Batched on-device augmentation and normalization, all jit-able.

Images arrive as uint8 (B, H, W, C). Augmentations act on the raw pixels (zero padding is black,
as torchvision's ``RandomCrop(32, padding=4)``), normalization comes last and returns float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxcifar.names import AUGMENT_MODES, PAD_MODES


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Returns ``(images / 255 - mean) / std`` as float32 (B, H, W, C)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def denormalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Inverse of ``normalize``: returns float32 images in [0, 1] (clipped), same shape."""
    x = images * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
    return jnp.clip(x, 0.0, 1.0)


def pad_images(images: jax.Array, padding: int, pad_mode: str = "zeros") -> jax.Array:
    """Returns (B, H + 2p, W + 2p, C): ``images`` padded by ``padding`` pixels on each side, with zeros or by
    reflection (``PAD_MODES``; reflect mirrors without repeating the edge pixel, as PyTorch's F.pad 'reflect')."""
    if pad_mode not in PAD_MODES:
        raise ValueError(f"unknown pad mode {pad_mode!r}; one of {', '.join(PAD_MODES)}")
    widths = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jnp.pad(images, widths, mode="constant" if pad_mode == "zeros" else "reflect")


def random_crop(rng: jax.Array, images: jax.Array, padding: int = 4, pad_mode: str = "zeros") -> jax.Array:
    """Pads by ``padding`` pixels (``pad_images``: zeros or reflect) and takes a random crop of the original
    size per image (every shift in [-padding, padding] equally likely). Returns the same shape and dtype as
    ``images`` (B, H, W, C).
    """
    b, h, w, _ = images.shape
    padded = pad_images(images, padding, pad_mode)
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_flip(rng: jax.Array, images: jax.Array, flip: jax.Array | None = None) -> jax.Array:
    """Mirrors each image left-right with probability 1/2, or where ``flip`` (bool (B,)) is True when given.
    Returns the same shape and dtype."""
    if flip is None:
        flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def alternating_flip(key: jax.Array, index: jax.Array, epoch: jax.Array) -> jax.Array:
    """airbench's alternating flip: returns bool (B,), whether the training images ``index`` (int (B,)) are
    mirrored in ``epoch`` (0-based). A coin per image, fixed by ``key`` and the image's index, decides
    epoch 0; every later epoch flips the decision of the one before, so each image is mirrored on exactly
    every other epoch (half the set in each epoch, in expectation)."""
    coins = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i)))(index)
    return jnp.logical_xor(coins, epoch % 2 == 1)


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


def augment(
    rng: jax.Array,
    images: jax.Array,
    mode: str,
    cutout_size: int = 8,
    padding: int = 4,
    pad_mode: str = "zeros",
    flip: jax.Array | None = None,
) -> jax.Array:
    """Applies the augmentation ``mode`` (one of ``AUGMENT_MODES``) to a uint8 batch: the crop pads by
    ``padding`` pixels filled as ``pad_mode``; ``flip`` (bool (B,)) replaces the flip's coins when given
    (``alternating_flip``).

    Returns the augmented batch, same shape and dtype. Raises ValueError naming the modes for any other ``mode``.
    """
    if mode not in AUGMENT_MODES:
        raise ValueError(f"unknown augmentation {mode!r}; one of {', '.join(AUGMENT_MODES)}")
    if mode == "none":
        return images
    crop_key, flip_key, cutout_key = jax.random.split(rng, 3)
    if mode in ("crop-flip", "crop-flip-cutout"):
        images = random_crop(crop_key, images, padding, pad_mode)
    images = random_flip(flip_key, images, flip)
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


def _reflect_shift(offset: int, mirror: bool) -> Callable[[jax.Array], jax.Array]:
    """The view cropped at ``(offset, offset)`` from the 1-px reflect-padded image (0: content moves 1 px
    down-right, i.e. airbench's "up-left" crop; 2: up-left), then mirrored when ``mirror``."""

    def view(images: jax.Array) -> jax.Array:
        h, w = images.shape[1:3]
        shifted = pad_images(images, 1, "reflect")[:, offset : offset + h, offset : offset + w, :]
        return _mirror(shifted) if mirror else shifted

    return view


# Test-time augmentation (``Config.tta``, ``--tta``): each mode's views, in stacking order. The one table
# that ``TTA_MODES``, ``tta_view_count`` and ``tta_views`` all read.
_TTA_VIEWS: dict[str, tuple[Callable[[jax.Array], jax.Array], ...]] = {
    "none": (_original,),
    "flip": (_original, _mirror),
    "flip-translate": (_original, _mirror, *(_translate(dy, dx) for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)))),
    "multi-crop": (
        _original,
        _mirror,
        *(_reflect_shift(offset, mirror) for offset in (0, 2) for mirror in (False, True)),
    ),
}
TTA_MODES = tuple(_TTA_VIEWS)
# Modes that average weighted logits (airbench's TTA) instead of the softmax: each view's weight.
_LOGIT_WEIGHTS: dict[str, tuple[float, ...]] = {"multi-crop": (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)}


def tta_log_probs(logits: jax.Array, mode: str) -> jax.Array:
    """Combines the logits of ``tta_views``' views, (V, B, K), into float32 log-probabilities (B, K): the log of
    the mean softmax over the views, or for ``multi-crop`` the log-softmax of the weighted mean of the logits
    (weights 1/4 for the original and the mirror, 1/8 for each shifted view, as airbench)."""
    logits = logits.astype(jnp.float32)
    if mode in _LOGIT_WEIGHTS:
        weights = jnp.asarray(_LOGIT_WEIGHTS[mode], jnp.float32)
        return jax.nn.log_softmax(jnp.einsum("v,vbk->bk", weights, logits), axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(logits.shape[0])


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
    translations of the original (zero-filled edge; V=6); ``multi-crop``: the original, the mirror, then
    the 1-px reflect-padded crops at offset 0 and 2 (each, then its mirror; V=6). Raises ValueError for a
    mode not in ``TTA_MODES``.
    """
    return jnp.stack([view(images) for view in _tta_view_fns(mode)])
