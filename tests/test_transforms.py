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


@pytest.mark.parametrize("mode", ["none", "flip", "crop-flip", "crop-flip-cutout"])
def test_augment_keeps_shape_dtype_and_range(images, mode):
    out = jax.jit(transforms.augment, static_argnums=(2, 3))(jax.random.PRNGKey(1), images, mode, 8)
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, jnp.uint8)
    if mode == "none":
        chex.assert_trees_all_equal(out, images)


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
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    x = transforms.normalize(images, mean, std)
    chex.assert_type(x, jnp.float32)
    assert float(jnp.abs(x.mean())) < 1.0
    back = transforms.denormalize(x, mean, std)
    chex.assert_trees_all_close(back, images.astype(jnp.float32) / 255.0, atol=1e-6)
