"""Faithfulness of CAM maps, as pytorch-grad-cam 1.5.7's ``metrics`` define them, batched and jitted.

All metrics compare the target score (``cam.target_scores``: logit or softmax probability of each
image's target class) of perturbed images with that of the images themselves, and return one value
per image (B,):

- ``confidence_change``: score(images * map) - score(images), the map (B, H, W) in [0, 1]
  multiplying every channel of the normalized image (``CamMultImageConfidenceChange``);
  ``drop_in_confidence`` = max(-change, 0) (``DropInConfidence``), ``increase_in_confidence`` =
  1 where change > 0 else 0 (``IncreaseInConfidence``).
- ``road``: ROAD (Rong et al., 2022, arXiv:2202.00449), score(imputed) - score(images). ``most_relevant_first``
  keeps the pixels whose map value is below the map's ``percentile``-th percentile (linear
  interpolation, as ``np.percentile``) and imputes the others (``ROADMostRelevantFirst``); otherwise it
  does the same with 1 - map (``ROADLeastRelevantFirst``). ``percentile="auto"`` is pytorch-grad-cam's
  Otsu variant: it keeps the pixels whose level ``uint8(map * 255)`` is above Otsu's threshold, so,
  as there, most-relevant-first "auto" removes the low-map pixels (the opposite of the percentile rule).
  The imputation is pytorch-grad-cam's ``NoisyLinearImputer``: each removed pixel is the weighted mean
  of its 8 neighbours (weights 1/6 for the 4 direct ones, 1/12 for the diagonals, neighbours outside
  the image left out), a sparse linear system per image and channel (pytorch-grad-cam: scipy
  ``spsolve``), plus ``noise`` times standard normal noise (pytorch-grad-cam: 0.01, unseeded; here
  ``noise`` with a ``key``, default 0). Here the systems are solved together by conjugate gradients,
  the operator applied as 8 shifted adds (no matrix), to a residual of ``ROAD_TOLERANCE``.
  ``road_average`` averages over percentiles (``ROADMostRelevantFirstAverage`` /
  ``ROADLeastRelevantFirstAverage``); ``road_combined`` is (LeRF average - MoRF average) / 2
  (``ROADCombined``).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar import cam, gradcam
from jaxcifar.backend import lazy_jit

ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # pytorch-grad-cam's AveragerAcrossThresholds default
ROAD_NOISE = 0.0  # pytorch-grad-cam's NoisyLinearImputer uses 0.01 (unseeded); 0 makes ROAD deterministic
ROAD_TOLERANCE = 1e-7  # conjugate gradients stop at this residual, relative to the right-hand side
# NoisyLinearImputer's neighbour weights: (row offset, column offset) -> weight.
NEIGHBOR_WEIGHTS = {
    (1, 1): 1 / 12,
    (0, 1): 1 / 6,
    (-1, 1): 1 / 12,
    (1, -1): 1 / 12,
    (0, -1): 1 / 6,
    (-1, -1): 1 / 12,
    (1, 0): 1 / 6,
    (-1, 0): 1 / 6,
}


def _scores(
    model: nn.Module, variables: dict[str, Any], images: jax.Array, targets: jax.Array, target: str
) -> jax.Array:
    return cam.target_scores(model.apply(variables, images, train=False), targets, target)


@functools.partial(lazy_jit, static_argnames=("model", "target"))
def _confidence_change(
    model: nn.Module, target: str, variables: dict[str, Any], images: jax.Array, cams: jax.Array, targets: jax.Array
) -> jax.Array:
    both = jnp.concatenate([images * cams[..., None].astype(images.dtype), images])
    scores = _scores(model, variables, both, jnp.tile(targets, 2), target)
    return scores[: len(images)] - scores[len(images) :]


def neighbor_sum(values: jax.Array) -> jax.Array:
    """(..., H, W) -> (..., H, W): each pixel's weighted sum of its 8 neighbours (``NEIGHBOR_WEIGHTS``),
    neighbours outside the image left out (zero padding)."""
    h, w = values.shape[-2:]
    padded = jnp.pad(values, [(0, 0)] * (values.ndim - 2) + [(1, 1), (1, 1)])
    return sum(
        weight * padded[..., 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] for (dr, dc), weight in NEIGHBOR_WEIGHTS.items()
    )


def _solve_removed(image: jax.Array, removed: jax.Array, total: jax.Array) -> jax.Array:
    """One channel (H, W): the removed pixels (``removed`` True) solved, the others left as they are."""

    # Removed pixels: total_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij image_j (a Dirichlet graph
    # Laplacian, symmetric positive definite); kept pixels: x_i = image_i. Matrix-free conjugate gradients.
    def operator(x: jax.Array) -> jax.Array:
        return jnp.where(removed, total * x - neighbor_sum(jnp.where(removed, x, 0.0)), x)

    rhs = jnp.where(removed, neighbor_sum(jnp.where(removed, 0.0, image)), image)
    solution, _ = jax.scipy.sparse.linalg.cg(
        operator,
        rhs,
        x0=jnp.where(removed, 0.0, image),
        tol=ROAD_TOLERANCE,
        atol=0.0,
        maxiter=image.size,  # conjugate gradients end in at most n steps in exact arithmetic
        M=lambda r: jnp.where(removed, r / total, r),  # Jacobi: total is 1 inside, less at the border
    )
    return solution


def impute(images: jax.Array, keep: jax.Array, noise: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """NoisyLinearImputer on a batch: (B, H, W, C) images, (B, H, W) bool ``keep`` -> (B, H, W, C) images
    whose removed pixels (``keep`` False) are the solution of the neighbour-mean system, plus noise.

    One system per image and channel, solved by conjugate gradients (``ROAD_TOLERANCE``) with the
    8-neighbour operator applied as shifted adds, all systems at once (``vmap``)."""
    b, h, w, c = images.shape
    channels = jnp.moveaxis(images, -1, 1).reshape(b * c, h, w)
    removed = jnp.repeat(~keep, c, axis=0)
    total = neighbor_sum(jnp.ones((h, w), images.dtype))  # the weights of the neighbours inside the image
    solved = jax.vmap(_solve_removed, in_axes=(0, 0, None))(channels, removed, total)
    filled = jnp.moveaxis(solved.reshape(b, c, h, w), 1, -1)
    if noise:
        if key is None:
            raise ValueError("ROAD with noise needs a PRNG key")
        filled = filled + jnp.where(keep[..., None], 0.0, noise * jax.random.normal(key, filled.shape, filled.dtype))
    return jnp.where(keep[..., None], images, filled)


def otsu_threshold(levels: jax.Array) -> jax.Array:
    """(B, H, W) uint8 -> (B,) int32 Otsu's threshold of each image as OpenCV's ``THRESH_OTSU`` picks it:
    the first level t that maximizes the between-class variance of the levels <= t and > t (0 if none).
    In float32 (OpenCV: float64), so two levels whose variances tie to ~1e-7 could be picked differently."""
    counts = jax.vmap(lambda x: jnp.bincount(x.ravel(), length=256))(levels)
    p = counts.astype(jnp.float32) / levels[0].size
    q1 = jnp.cumsum(p, axis=-1)
    q2 = 1.0 - q1
    below = jnp.cumsum(jnp.arange(256) * p, axis=-1)  # q1 * mean of the levels <= t
    eps = float(np.finfo(np.float32).eps)  # OpenCV skips levels where either class holds < FLT_EPSILON
    valid = (jnp.minimum(q1, q2) >= eps) & (jnp.maximum(q1, q2) <= 1.0 - eps)
    mean1 = below / jnp.where(valid, q1, 1.0)
    mean2 = (below[:, -1:] - below) / jnp.where(valid, q2, 1.0)
    between = jnp.where(valid, q1 * q2 * (mean1 - mean2) ** 2, 0.0)
    return jnp.argmax(between, axis=-1).astype(jnp.int32)


def road_keep(cams: jax.Array, percentile: float | str, most_relevant_first: bool) -> jax.Array:
    """(B, H, W) bool: pixels ROAD keeps. For a number, those whose map value is below the map's
    ``percentile``-th percentile (least-relevant-first: the same on 1 - map). For ``"auto"``, as
    pytorch-grad-cam: those whose level ``uint8(map * 255)`` is above Otsu's threshold (``otsu_threshold``)."""
    ranked = cams if most_relevant_first else 1.0 - cams
    if percentile == "auto":
        levels = (ranked * 255).astype(jnp.uint8)
        return levels > otsu_threshold(levels)[:, None, None]
    threshold = jnp.percentile(ranked, percentile, axis=(1, 2), keepdims=True)
    return ranked < threshold


@functools.partial(lazy_jit, static_argnames=("model", "target", "percentiles", "most_relevant_first", "noise"))
def _road(
    model: nn.Module,
    target: str,
    percentiles: tuple[float | str, ...],
    most_relevant_first: bool,
    noise: float,
    variables: dict[str, Any],
    images: jax.Array,
    cams: jax.Array,
    targets: jax.Array,
    key: jax.Array | None,
) -> jax.Array:
    """(len(percentiles), B) score changes."""
    n, b = len(percentiles), len(images)
    keep = jnp.concatenate([road_keep(cams, p, most_relevant_first) for p in percentiles])
    tiled = jnp.tile(images, (n, 1, 1, 1))
    imputed = impute(tiled, keep, noise, key)
    scores = _scores(model, variables, jnp.concatenate([imputed, images]), jnp.tile(targets, n + 1), target)
    return (scores[: n * b] - jnp.tile(scores[n * b :], n)).reshape(n, b)


@functools.partial(lazy_jit, static_argnames=("model", "target"))
def _faithfulness(
    model: nn.Module, target: str, variables: dict[str, Any], images: jax.Array, cams: jax.Array, targets: jax.Array
) -> jax.Array:
    """(3, B): confidence change, ROAD most-relevant-first (80) and least-relevant-first (20), zero noise,
    from one forward of the 4 * B images."""
    b = len(images)
    keep = jnp.concatenate([road_keep(cams, 80.0, True), road_keep(cams, 20.0, False)])
    imputed = impute(jnp.tile(images, (2, 1, 1, 1)), keep)
    batch = jnp.concatenate([images * cams[..., None].astype(images.dtype), imputed, images])
    scores = _scores(model, variables, batch, jnp.tile(targets, 4), target).reshape(4, b)
    return scores[:3] - scores[3]


def _arguments(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    cams: jax.Array,
    targets: jax.Array | Sequence[int] | None,
    target: str,
) -> tuple[dict[str, Any], jax.Array, jax.Array, jax.Array]:
    """Checked (variables, images, cams, int32 targets: given, else the predicted classes)."""
    if target not in cam.TARGETS:
        raise ValueError(f"unknown target {target!r}; available: {', '.join(cam.TARGETS)}")
    images = jnp.asarray(images)
    gradcam._check_images(model, variables, images)
    cams = jnp.asarray(cams)
    if cams.shape != images.shape[:3]:
        raise ValueError(f"cams must be (B, H, W) = {images.shape[:3]} like the images, got {cams.shape}")
    variables = gradcam._model_variables(variables)
    if targets is None:
        targets = jnp.argmax(model.apply(variables, images, train=False), axis=-1).astype(jnp.int32)
    else:
        targets = cam._checked_targets(model, variables, images, targets)
    return variables, images, cams, targets


def confidence_change(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    cams: jax.Array,
    targets: jax.Array | Sequence[int] | None = None,
    *,
    target: str = "logit",
) -> jax.Array:
    """(B,) score(images * cams) - score(images) (``CamMultImageConfidenceChange``).

    ``images`` normalized float (B, H, W, C), ``cams`` (B, H, W) in [0, 1], ``targets`` int (B,)
    (default: the predicted classes), ``target`` ``"logit"`` or ``"softmax"``. One jitted call.
    """
    variables, images, cams, targets = _arguments(model, variables, images, cams, targets, target)
    return _confidence_change(model, target, variables, images, cams, targets)


def drop_in_confidence(*args: Any, **kwargs: Any) -> jax.Array:
    """(B,) max(-confidence_change, 0) (``DropInConfidence``); arguments as ``confidence_change``."""
    return jnp.maximum(-confidence_change(*args, **kwargs), 0.0)


def increase_in_confidence(*args: Any, **kwargs: Any) -> jax.Array:
    """(B,) 1.0 where confidence_change > 0, else 0.0 (``IncreaseInConfidence``); arguments as ``confidence_change``."""
    change = confidence_change(*args, **kwargs)
    return (change > 0).astype(change.dtype)


def road_average(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    cams: jax.Array,
    targets: jax.Array | Sequence[int] | None = None,
    *,
    most_relevant_first: bool = True,
    percentiles: Sequence[float | str] = ROAD_PERCENTILES,
    target: str = "logit",
    noise: float = ROAD_NOISE,
    key: jax.Array | None = None,
) -> jax.Array:
    """(B,) ROAD score change averaged over ``percentiles`` (see the module docstring).

    Arguments as ``confidence_change``; ``noise`` > 0 needs a PRNG ``key``. One jitted call.
    """
    if not percentiles or any(p != "auto" and not (isinstance(p, numbers.Real) and 0 < p < 100) for p in percentiles):
        raise ValueError(f"ROAD percentiles must be numbers in (0, 100) or 'auto', got {list(percentiles)}")
    percentiles = tuple(p if p == "auto" else float(p) for p in percentiles)
    if noise < 0 or (noise > 0 and key is None):
        raise ValueError(f"ROAD noise must be >= 0, and > 0 only with a PRNG key; got {noise}")
    variables, images, cams, targets = _arguments(model, variables, images, cams, targets, target)
    changes = _road(
        model, target, percentiles, bool(most_relevant_first), float(noise), variables, images, cams, targets, key
    )
    return jnp.mean(changes, axis=0)


def road(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    cams: jax.Array,
    targets: jax.Array | Sequence[int] | None = None,
    *,
    percentile: float | str | None = None,
    most_relevant_first: bool = True,
    **kwargs: Any,
) -> jax.Array:
    """(B,) ROAD score change at one ``percentile`` (default 80 most-relevant-first, 20 least-relevant-first,
    as ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst``); other arguments as ``road_average``."""
    if percentile is None:
        percentile = 80 if most_relevant_first else 20
    return road_average(
        model,
        variables,
        images,
        cams,
        targets,
        most_relevant_first=most_relevant_first,
        percentiles=(percentile,),
        **kwargs,
    )


def road_combined(*args: Any, **kwargs: Any) -> jax.Array:
    """(B,) (LeRF average - MoRF average) / 2 (``ROADCombined``); arguments as ``road_average``."""
    lerf = road_average(*args, most_relevant_first=False, **kwargs)
    morf = road_average(*args, most_relevant_first=True, **kwargs)
    return (lerf - morf) / 2


def faithfulness(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    cams: jax.Array,
    targets: jax.Array | Sequence[int] | None = None,
    *,
    target: str = "logit",
) -> dict[str, np.ndarray]:
    """The metrics of one set of maps, each float (B,): ``confidence_change``, ``drop_in_confidence``,
    ``increase_in_confidence``, ``road_morf`` (percentile 80) and ``road_lerf`` (percentile 20), zero noise.
    One jitted call (one forward of the perturbed and plain images); arguments as ``confidence_change``."""
    variables, images, cams, targets = _arguments(model, variables, images, cams, targets, target)
    change, morf, lerf = np.asarray(_faithfulness(model, target, variables, images, cams, targets))
    return {
        "confidence_change": change,
        "drop_in_confidence": np.maximum(-change, 0.0),
        "increase_in_confidence": (change > 0).astype(change.dtype),
        "road_morf": morf,
        "road_lerf": lerf,
    }
