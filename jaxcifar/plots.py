"""Figures for a trained run: learning curves, learning rate, misclassified and Grad-CAM galleries, confusion.

Every function builds a ``matplotlib.figure.Figure`` directly (no pyplot, no global backend change, so
notebooks keep their inline backend and scripts need no display), returns it, and saves it as a PNG of
``figsize * dpi`` pixels when ``path`` is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxcifar.files import save_figure
from jaxcifar.gradcam import overlay

History = Sequence[Mapping[str, Any]]
PANEL_INCHES = 2.2  # one gallery image; CIFAR's 32x32 pixels become ~7x7 screen pixels each at dpi 100.
_SPLIT_STYLES = {"train": "-", "val": "-.", "test": "--"}


def _finish(fig: Figure, path: str | Path | None, dpi: int) -> Figure:
    """Saves ``fig`` as a PNG at ``path`` (if given, creating parent folders) and returns it."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, path, dpi=dpi)
    return fig


def _as_float01(images: np.ndarray) -> np.ndarray:
    """uint8 images become float32 / 255; float images are clipped to [0, 1]. Same shape."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return np.clip(images.astype(np.float32), 0.0, 1.0)


def _image_axes(ax: Axes, image: np.ndarray, title: str) -> None:
    """Shows one image pixel-exact (nearest) without ticks, with a small title."""
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _empty_figure(message: str, dpi: int) -> Figure:
    """A small figure that says ``message`` (for an empty gallery)."""
    fig = Figure(figsize=(4, 1), dpi=dpi)
    fig.text(0.5, 0.5, message, ha="center", va="center")
    return fig


def _series(history: History, key: str) -> tuple[list[Any], list[float]]:
    """(epochs, values) of ``key`` over the records that have it."""
    rows = [r for r in history if r.get(key) is not None]
    return [r["epoch"] for r in rows], [float(r[key]) for r in rows]


def plot_curves(history: History, path: str | Path | None = None, dpi: int = 100) -> Figure:
    """Loss and accuracy per epoch, train vs test (and val when recorded), in two panels.

    ``history`` is a list of per-epoch dicts with ``epoch``, ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` and optionally ``val_loss``, ``val_acc`` (accuracies as fractions,
    shown in %). Returns the 11 x 4 inch Figure.
    """
    fig = Figure(figsize=(11, 4), dpi=dpi, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for split, style in _SPLIT_STYLES.items():
        epochs, losses = _series(history, f"{split}_loss")
        if epochs:
            loss_ax.plot(epochs, losses, style, marker=".", label=split)
        epochs, accs = _series(history, f"{split}_acc")
        if epochs:
            acc_ax.plot(epochs, [100 * a for a in accs], style, marker=".", label=f"{split} ({100 * accs[-1]:.2f}%)")
    for ax, ylabel in ((loss_ax, "cross-entropy loss"), (acc_ax, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_title("Loss")
    acc_ax.set_title("Accuracy")
    return _finish(fig, path, dpi)


def plot_lr(
    schedule: History | tuple[Sequence[float], Sequence[float]],
    path: str | Path | None = None,
    dpi: int = 100,
    steps_per_epoch: int | None = None,
) -> Figure:
    """Learning rate over training: from a history (``lr`` per ``epoch``) or a ``(steps, lrs)`` pair (0-based
    steps; with ``steps_per_epoch`` drawn against the epoch, ``step / steps_per_epoch``: 0 to the run's epochs,
    the axis of ``plot_curves``; else against the step).

    Returns the 6 x 4 inch Figure.
    """
    if isinstance(schedule, tuple) and len(schedule) == 2 and not isinstance(schedule[0], Mapping):
        xs, lrs, xlabel = list(schedule[0]), [float(v) for v in schedule[1]], "step"
        if steps_per_epoch is not None:
            xs, xlabel = [x / steps_per_epoch for x in xs], "epoch"
    else:
        (xs, lrs), xlabel = _series(schedule, "lr"), "epoch"
    fig = Figure(figsize=(6, 4), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    ax.plot(xs, lrs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.grid(alpha=0.3)
    return _finish(fig, path, dpi)


def plot_misclassified(
    images01: np.ndarray,
    true: Sequence[int],
    pred: Sequence[int],
    confidence: Sequence[float],
    class_names: Sequence[str],
    n: int = 10,
    ncols: int = 5,
    path: str | Path | None = None,
    dpi: int = 100,
) -> Figure:
    """Gallery of the first ``n`` images, each titled "true → predicted (confidence %)".

    ``images01`` (N, H, W, 3) de-normalized floats in [0, 1] (or uint8); ``confidence`` is the
    probability of the predicted class. Returns a Figure of ``ncols`` columns, 2.2 x 2.4 inches per image.
    """
    count = min(n, len(images01))
    if count == 0:
        return _finish(_empty_figure("no misclassified images", dpi), path, dpi)
    images = _as_float01(images01[:count])
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(PANEL_INCHES * ncols, (PANEL_INCHES + 0.2) * nrows), dpi=dpi, layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i >= count:
            ax.set_axis_off()
            continue
        title = f"{class_names[int(true[i])]} → {class_names[int(pred[i])]} ({100 * float(confidence[i]):.0f}%)"
        _image_axes(ax, images[i], title)
    return _finish(fig, path, dpi)


def plot_gradcam(
    images01: np.ndarray,
    cams: np.ndarray,
    true: Sequence[int],
    pred: Sequence[int],
    class_names: Sequence[str],
    layer_label: str = "layer3, 8x8",
    alpha: float = 0.5,
    ncols: int = 5,
    path: str | Path | None = None,
    dpi: int = 100,
) -> Figure:
    """For each image, the image ("true → predicted") beside its Grad-CAM overlay ("Grad-CAM <layer_label>").

    ``images01`` (N, H, W, 3) in [0, 1] (or uint8), ``cams`` (N, H, W) in [0, 1] from ``grad_cam``,
    ``alpha`` the heatmap weight. ``ncols`` image pairs per row. Returns the Figure (2.2 x 2.4 inches
    per panel).
    """
    count = len(images01)
    if count == 0:
        return _finish(_empty_figure("no images", dpi), path, dpi)
    images = _as_float01(images01)
    blended = overlay(images, np.asarray(cams), alpha=alpha)
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(2 * PANEL_INCHES * ncols, (PANEL_INCHES + 0.2) * nrows + 0.3), dpi=dpi, layout="constrained")
    axes = np.asarray(fig.subplots(nrows, 2 * ncols, squeeze=False)).reshape(-1, 2)
    for i, (image_ax, cam_ax) in enumerate(axes):
        if i >= count:
            image_ax.set_axis_off()
            cam_ax.set_axis_off()
            continue
        _image_axes(image_ax, images[i], f"{class_names[int(true[i])]} → {class_names[int(pred[i])]}")
        _image_axes(cam_ax, blended[i], f"Grad-CAM {layer_label}")
    fig.suptitle(f"Grad-CAM at {layer_label} (true → predicted)")
    return _finish(fig, path, dpi)


def plot_cam_methods(
    images01: np.ndarray,
    cams: Mapping[str, np.ndarray],
    true: Sequence[int],
    pred: Sequence[int],
    class_names: Sequence[str],
    layer_label: str = "layer3, 8x8",
    alpha: float = 0.5,
    path: str | Path | None = None,
    dpi: int = 100,
) -> Figure:
    """One row per image: the image ("true → predicted") then the overlay of each method's map.

    ``images01`` (N, H, W, 3) in [0, 1] (or uint8); ``cams`` maps a method name to its (N, H, W) maps in
    [0, 1] (columns in that order). Returns the Figure (2.2 x 2.4 inches per panel).
    """
    count = len(images01)
    if count == 0 or not cams:
        return _finish(_empty_figure("no images", dpi), path, dpi)
    images = _as_float01(images01)
    ncols = 1 + len(cams)
    fig = Figure(figsize=(PANEL_INCHES * ncols, (PANEL_INCHES + 0.2) * count + 0.3), dpi=dpi, layout="constrained")
    axes = np.asarray(fig.subplots(count, ncols, squeeze=False))
    for i in range(count):
        _image_axes(axes[i, 0], images[i], f"{class_names[int(true[i])]} → {class_names[int(pred[i])]}")
        for j, (method, maps) in enumerate(cams.items(), start=1):
            _image_axes(axes[i, j], overlay(images[i], np.asarray(maps[i]), alpha=alpha), method)
    fig.suptitle(f"CAM methods at {layer_label}, predicted class (true → predicted)")
    return _finish(fig, path, dpi)


def plot_confusion(
    cm: np.ndarray, class_names: Sequence[str], path: str | Path | None = None, dpi: int = 100
) -> Figure:
    """Confusion matrix (rows = true, columns = predicted) with each count written in its cell.

    Returns the 8 x 7 inch Figure.
    """
    cm = np.asarray(cm)
    fig = Figure(figsize=(8, 7), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="count")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = cm.sum()
    accuracy = np.trace(cm) / total if total else float("nan")
    ax.set_title(f"Confusion matrix (accuracy {100 * accuracy:.2f}%)")
    for (row, col), count in np.ndenumerate(cm):
        color = "white" if image.norm(count) > 0.5 else "black"  # readable on dark and light cells
        ax.text(col, row, str(int(count)), ha="center", va="center", fontsize=8, color=color)
    return _finish(fig, path, dpi)


def figure_to_array(fig: Figure) -> np.ndarray:
    """Renders ``fig`` at its own dpi; returns uint8 (H, W, 3) RGB (e.g. for TensorBoard ``add_image``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def plot_lr_find(
    lrs: Sequence[float],
    losses: Sequence[float],
    suggestion: float,
    steepest: float | None = None,
    path: str | Path | None = None,
    dpi: int = 100,
    rule: str | None = None,
) -> Figure:
    """LR range test: smoothed loss against LR (log x-axis), the suggested LR marked (and the steepest).

    ``rule`` names how the suggestion was chosen, in its label. Returns the 6 x 4 inch Figure.
    """
    fig = Figure(figsize=(6, 4), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    lrs_arr, losses_arr = np.asarray(lrs, float), np.asarray(losses, float)
    ax.plot(lrs_arr, losses_arr)
    ax.set_xscale("log")
    at = float(np.interp(np.log(suggestion), np.log(lrs_arr), losses_arr))
    label = f"suggested max LR {suggestion:.2g}" + (f" ({rule})" if rule else "")
    ax.plot([suggestion], [at], "o", color="tab:red", label=label)
    if steepest is not None:
        at = float(np.interp(np.log(steepest), np.log(lrs_arr), losses_arr))
        ax.plot([steepest], [at], "s", color="tab:green", label=f"steepest descent {steepest:.2g}")
    finite = losses_arr[np.isfinite(losses_arr)]
    if finite.size:
        ax.set_ylim(finite.min() - 0.05 * np.ptp(finite), min(finite.max(), 4 * finite.min()) + 0.05 * np.ptp(finite))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _finish(fig, path, dpi)
