"""ROAD's parts without torch: the imputation against a dense solve of NoisyLinearImputer's system written
out pixel by pixel, and the "auto" threshold against OpenCV's Otsu. The metrics against pytorch-grad-cam
itself are in tests/test_cam_torch.py."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcifar import cam_metrics

OFFSETS = {(dr, dc): (1 / 6 if dr == 0 or dc == 0 else 1 / 12) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc}


def _dense_imputation(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """One (H, W, C) image: each removed pixel the weighted mean of its neighbours inside the image, solved
    in float64 with one equation per pixel."""
    h, w, _ = image.shape
    n = h * w
    system, rhs = np.eye(n), image.reshape(n, -1).astype(np.float64).copy()
    for r in range(h):
        for c in range(w):
            if keep[r, c]:
                continue
            i = r * w + c
            system[i, i], rhs[i] = 0.0, 0.0
            for (dr, dc), weight in OFFSETS.items():
                if 0 <= r + dr < h and 0 <= c + dc < w:
                    system[i, i] += weight
                    j = (r + dr) * w + c + dc
                    if keep[r + dr, c + dc]:
                        rhs[i] += weight * image[r + dr, c + dc]
                    else:
                        system[i, j] -= weight
    return np.linalg.solve(system, rhs).reshape(image.shape)


def test_impute_solves_the_neighbour_mean_system():
    """Removed blocks (one touching the corner and the border, so the border weights count) and scattered
    pixels; kept pixels unchanged."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 9, 11, 3)).astype(np.float32)
    keep = rng.uniform(size=(3, 9, 11)) > 0.4
    keep[0, :5, :6] = False
    keep[1, 3:8, 2:10] = False
    keep[2] = False
    keep[2, 4, 5] = True  # one known pixel: the whole image takes its value
    filled = np.asarray(jax.jit(cam_metrics.impute)(jnp.asarray(images), jnp.asarray(keep)))
    chex.assert_shape(filled, images.shape)
    expected = np.stack([_dense_imputation(i, k) for i, k in zip(images, keep, strict=True)])
    np.testing.assert_allclose(filled, expected, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(filled[keep], images[keep])
    np.testing.assert_allclose(filled[2], np.broadcast_to(images[2, 4, 5], images[2].shape), atol=2e-5)


def test_otsu_threshold_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    bimodal = np.where(rng.uniform(size=(32, 32)) < 0.3, rng.normal(60, 10, (32, 32)), rng.normal(180, 20, (32, 32)))
    levels = np.stack(
        [
            np.clip(bimodal, 0, 255),
            rng.uniform(0, 255, (32, 32)),
            (rng.uniform(size=(32, 32)) ** 3) * 255,  # skewed
            np.full((32, 32), 7.0),  # one level: no threshold separates anything
            np.where(rng.uniform(size=(32, 32)) < 0.5, 3.0, 250.0),  # two levels, empty bins between
        ]
    ).astype(np.uint8)
    ours = np.asarray(jax.jit(cam_metrics.otsu_threshold)(jnp.asarray(levels)))
    expected = [cv2.threshold(x, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0] for x in levels]
    np.testing.assert_array_equal(ours, expected)


def test_road_keep_auto_keeps_the_levels_above_otsu():
    """As pytorch-grad-cam's RemoveMostRelevantFirst('auto'): the kept pixels are the high-map ones."""
    maps = jnp.asarray(np.where(np.arange(64).reshape(1, 8, 8) < 20, 0.1, 0.9), jnp.float32)
    keep = jax.jit(cam_metrics.road_keep, static_argnums=(1, 2))
    np.testing.assert_array_equal(keep(maps, "auto", True), maps > 0.5)
    np.testing.assert_array_equal(keep(maps, "auto", False), maps < 0.5)
    np.testing.assert_array_equal(keep(maps, 50.0, True), maps < 0.5)


@pytest.mark.parametrize("percentiles", [(), (0,), (100,), ("otsu",), (50, "median")])
def test_road_percentiles_outside_the_range_are_rejected(percentiles):
    with pytest.raises(ValueError, match=r"ROAD percentiles must be numbers in \(0, 100\) or 'auto'"):
        cam_metrics.road_average(None, {}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8)), percentiles=percentiles)
