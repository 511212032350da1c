"""Predictions over a whole split, misclassified examples, per-class accuracy and the confusion matrix.

``predict`` runs on the device in jitted fixed-size batches; the rest is host-side NumPy on its results.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar import backend, steps, transforms


@functools.partial(backend.lazy_jit, static_argnames=("model", "mean", "std", "tta"))
def _predict_batch(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    tta: str = "none",
) -> tuple[jax.Array, jax.Array]:
    """Eval-mode softmax of one uint8 batch (averaged over TTA views): float32 (B, C) and int32 (B,) argmax."""
    views = transforms.tta_views(transforms.normalize(images, mean, std), tta)
    v, b = views.shape[:2]
    flat = views.reshape(v * b, *views.shape[2:])
    chunk = backend.eval_chunk(jax.devices()[:1])  # predictions run on the default device
    logits = steps.apply_in_chunks(lambda x: model.apply(variables, x, train=False), flat, chunk)
    probs = jnp.exp(transforms.tta_log_probs(logits.reshape(v, b, -1), tta))
    return probs, jnp.argmax(probs, axis=-1).astype(jnp.int32)


def predict(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    tta: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Predicts a whole split: ``images`` uint8 (N, H, W, C), normalized with ``mean``/``std`` on the device.

    Runs eval-mode batches of ``min(batch_size, N)`` images (the last one zero-padded, so there is one
    compile per call shape); ``tta`` averages the softmax over test-time views
    (``transforms.tta_views``). Returns NumPy ``(probs, preds)``: float32 (N, num_classes) softmax
    probabilities and int32 (N,) ``argmax(probs)``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be non-empty uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n = len(images)
    batch = min(batch_size, n)
    padding = np.zeros((-n % batch, *images.shape[1:]), np.uint8)
    padded = np.concatenate([images, padding])
    stats = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    outputs = [
        _predict_batch(model, variables, padded[i : i + batch], *stats, tta) for i in range(0, len(padded), batch)
    ]
    probs = np.concatenate([np.asarray(p) for p, _ in outputs])[:n]
    preds = np.concatenate([np.asarray(p) for _, p in outputs])[:n]
    return probs, preds


@dataclasses.dataclass(frozen=True, eq=False)
class Misclassified:
    """Misclassified examples, most confident mistakes first (ties: lower index first).

    ``indices`` int64 (M,) into the split, ``images`` (M, H, W, C) as given (uint8), ``true`` and
    ``pred`` int32 (M,) labels, ``confidence`` float32 (M,) probability of the predicted class.
    """

    indices: np.ndarray
    images: np.ndarray
    true: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def misclassified(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, n: int | None = None) -> Misclassified:
    """Returns the ``n`` (None: all) misclassified examples, most confident mistakes first.

    ``images`` (N, H, W, C), ``labels`` int (N,), ``probs`` float (N, C) from ``predict``; the prediction
    is ``argmax(probs)``. The order depends only on the probabilities and indices (a stable sort), so
    it is the same for any seed that produced the same predictions.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs)
    if probs.ndim != 2 or len(probs) != len(labels) or len(images) != len(labels):
        raise ValueError(f"images {len(images)}, labels {labels.shape} and probs {probs.shape} disagree")
    preds = np.argmax(probs, axis=-1)
    wrong = np.flatnonzero(preds != labels)
    confidence = probs[wrong, preds[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:n]
    return Misclassified(
        indices=order.astype(np.int64),
        images=np.asarray(images)[order],
        true=labels[order].astype(np.int32),
        pred=preds[order].astype(np.int32),
        confidence=probs[order, preds[order]].astype(np.float32),
    )


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Returns int64 (num_classes, num_classes) counts: row = true class, column = predicted class."""
    labels, preds = np.asarray(labels).ravel(), np.asarray(preds).ravel()
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} disagree")
    for name, values in (("labels", labels), ("preds", preds)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), got range [{values.min()}, {values.max()}]")
    counts = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def per_class_accuracy(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Returns float64 (num_classes,): the fraction of each true class predicted correctly (NaN if absent)."""
    cm = confusion_matrix(labels, preds, num_classes)
    totals = cm.sum(axis=1)
    accuracy = np.full(num_classes, np.nan)
    np.divide(np.diag(cm), totals, out=accuracy, where=totals > 0)
    return accuracy
