"""On-device augmentation: shapes, dtypes, ranges and exact semantics."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcifar import transforms


@pytest.fixture(scope="module")
def images():
    return jax.random.randint(jax.random.PRNGKey(0), (16, 32, 32, 3), 1, 256).astype(jnp.uint8)


def _explain(out: np.ndarray, src: np.ndarray, padding: int) -> tuple[bool, int, int, np.ndarray]:
    """The (h, w) window of ``src`` (H, W, C) zero-padded by ``padding`` pixels, or of its mirror, that ``out``
    equals except on all-zero pixels (a cutout), with the fewest such pixels. Returns (mirrored, dy, dx,
    boolean (H, W) mask of the pixels that differ: they are all zero in ``out``). Fails when none fits."""
    h, w = src.shape[:2]
    padded = np.pad(src, ((padding, padding), (padding, padding), (0, 0)))
    best = None
    for mirrored in (False, True):
        source = padded[:, ::-1] if mirrored else padded
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                differs = (out != source[dy : dy + h, dx : dx + w]).any(-1)
                if (out[differs] == 0).all() and (best is None or differs.sum() < best[3].sum()):
                    best = (mirrored, dy, dx, differs)
    assert best is not None, "not a (mirrored) window of the zero-padded image, even allowing a zeroed square"
    return best


@pytest.mark.parametrize("mode", ["none", "flip", "crop-flip", "crop-flip-cutout"])
def test_augment_keeps_shape_dtype_and_range(images, mode):
    """Each mode applies exactly its transforms: ``none`` none; ``flip`` a mirror of about half the images;
    ``crop-flip`` + a 32x32 window of the 4-pixel zero-padded image; ``crop-flip-cutout`` + one zeroed square of
    ``cutout_size`` (clipped at the border, partly over black padding)."""
    out = jax.jit(transforms.augment, static_argnums=(2, 3))(jax.random.PRNGKey(1), images, mode, 8)
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, jnp.uint8)
    out, src = np.asarray(out), np.asarray(images)  # src pixels are 1..255: a zero is padding or cutout
    if mode == "none":
        np.testing.assert_array_equal(out, src)
        return
    padding = 0 if mode == "flip" else 4
    found = [_explain(out[b], src[b], padding) for b in range(len(src))]
    mirrored = [m for m, _, _, _ in found]
    assert 0 < sum(mirrored) < len(src), f"{sum(mirrored)} of {len(src)} images mirrored"  # some, not all
    shifts = {(dy, dx) for _, dy, dx, _ in found}
    if mode == "flip":
        assert shifts == {(0, 0)}, f"shifted windows {shifts}"
    else:  # random crops, some into the black padding
        assert len(shifts) > 1 and (out == 0).all(-1).any(), f"crop windows {shifts}: no random crop"
    for b, (_, _, _, differs) in enumerate(found):
        if mode != "crop-flip-cutout":
            assert not differs.any(), f"image {b}: {differs.sum()} pixels zeroed beyond the padding"
            continue
        rows, cols = np.nonzero(differs)
        if len(rows):  # inside one 8x8 square (what the crop's black padding does not already hide)
            assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8, f"image {b}: zeroed {rows}, {cols}"
    if mode == "crop-flip-cutout":
        areas = [int(differs.sum()) for _, _, _, differs in found]
        assert max(areas) == 64, f"zeroed areas {areas}: no whole 8x8 square"


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image(images):
    out = np.asarray(transforms.random_crop(jax.random.PRNGKey(2), images, padding=4))
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for b in range(images.shape[0]):
        windows = [padded[b, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(np.array_equal(out[b], w) for w in windows)
    assert (out == 0).any()  # some crops reach into the black padding


def test_flip_mirrors_about_half_the_images(images):
    out = np.asarray(transforms.random_flip(jax.random.PRNGKey(3), images))
    src = np.asarray(images)
    flipped = [np.array_equal(out[b], src[b, :, ::-1]) for b in range(len(src))]
    kept = [np.array_equal(out[b], src[b]) for b in range(len(src))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < len(src)


def test_cutout_zeroes_one_clipped_square(images):
    out = np.asarray(transforms.cutout(jax.random.PRNGKey(4), images, size=8))
    zeroed = (out == 0).all(-1) & (np.asarray(images) != 0).all(-1)
    for b in range(len(out)):
        area = zeroed[b].sum()
        assert 0 < area <= 64
        rows, cols = np.nonzero(zeroed[b])
        assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == area  # a rectangle


def test_normalize_roundtrip(images):
    """normalize is (x / 255 - mean) / std per channel in float32; denormalize inverts it and clips to [0, 1]."""
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    x = transforms.normalize(images, mean, std)
    chex.assert_type(x, jnp.float32)
    chex.assert_shape(x, images.shape)
    want = (np.asarray(images, np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)
    back = transforms.denormalize(x, mean, std)
    chex.assert_type(back, jnp.float32)
    np.testing.assert_allclose(back, np.asarray(images, np.float32) / 255.0, rtol=0, atol=1e-6)
    # out-of-range inputs (e.g. after MixUp or a model's gradient) come back clipped to [0, 1]
    z = np.float32([[-10.0, 0.0, 10.0]]).reshape(1, 1, 1, 3)
    want = np.clip(z * np.float32(std) + np.float32(mean), 0.0, 1.0)
    np.testing.assert_allclose(transforms.denormalize(jnp.asarray(z), mean, std), want, rtol=1e-6)


def test_augment_refuses_an_unknown_mode_naming_the_known_ones(images):
    for mode in ("crop", "Flip", "cutout", ""):
        with pytest.raises(
            ValueError, match=r"unknown augmentation .*; one of none, flip, crop-flip, crop-flip-cutout$"
        ):
            transforms.augment(jax.random.PRNGKey(5), images, mode)


def test_tta_view_count_is_what_tta_views_stacks(images):
    for mode in transforms.TTA_MODES:  # the view count that sizing.py budgets is the one tta_views stacks
        assert transforms.tta_view_count(mode) == transforms.tta_views(images, mode).shape[0]
    assert [transforms.tta_view_count(mode) for mode in transforms.TTA_MODES] == [1, 2, 6, 6]
    with pytest.raises(ValueError, match="unknown TTA mode 'rotate'; one of none, flip, flip-translate"):
        transforms.tta_view_count("rotate")
