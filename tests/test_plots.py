"""Plots: PNGs of the expected pixel size (figsize * dpi) holding what they show (the images' pixels in their
panels, the lines' colors), the plotted data and titles of every panel, no pyplot."""

from __future__ import annotations

import io
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from jaxcifar import plots

DPI = 40
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _history(with_val: bool) -> list[dict]:
    rows = []
    for epoch in range(1, 6):
        row = {
            "epoch": epoch,
            "train_loss": 2.0 / epoch,
            "train_acc": 0.3 + 0.1 * epoch,
            "test_loss": 2.2 / epoch,
            "test_acc": 0.25 + 0.1 * epoch,
            "lr": 0.1 * (1 - epoch / 6),
        }
        if with_val:
            row.update(val_loss=2.1 / epoch, val_acc=0.28 + 0.1 * epoch)
        rows.append(row)
    return rows


def _check_png(path, width_in: float, height_in: float) -> np.ndarray:
    """Checks the PNG's pixel size; returns its pixels, uint8 (H, W, 3)."""
    with Image.open(path) as image:
        assert image.size == (round(width_in * DPI), round(height_in * DPI))
        return np.asarray(image.convert("RGB"))


def _panel_pixels(png: np.ndarray, ax, shape: tuple[int, int]) -> np.ndarray:
    """The PNG's pixels at the centers of the cells of the (h, w) image shown in ``ax`` (after the save drew
    it): uint8 (h, w, 3)."""
    (x0, y0), (x1, y1) = ax.get_images()[0].get_window_extent().get_points()
    h, w = shape
    cols = (x0 + (np.arange(w) + 0.5) * (x1 - x0) / w).astype(int)
    rows = (png.shape[0] - (y1 - (np.arange(h) + 0.5) * (y1 - y0) / h)).astype(int)  # display y is upward
    return png[rows[:, None], cols[None, :]]


def _assert_shows(png: np.ndarray, ax, image01: np.ndarray) -> None:
    """The panel ``ax`` of ``png`` shows ``image01`` (float (h, w, 3) in [0, 1]) pixel for pixel (+-1 level)."""
    shown = _panel_pixels(png, ax, image01.shape[:2]).astype(int)
    close = np.abs(shown - np.round(image01 * 255)).max(-1) <= 1
    assert close.mean() >= 0.99, f"{ax.get_title()!r}: {close.mean():.1%} of the pixels shown"


def _has_color(png: np.ndarray, color, min_pixels: int = 20) -> bool:
    """Whether ``png`` has at least ``min_pixels`` pixels of ``color`` (a matplotlib color, e.g. a line's) drawn
    over white with at least half opacity (thin lines are antialiased: never the full color at low dpi)."""
    c = np.asarray(to_rgb(color)) * 255
    alpha = ((255.0 - png) @ (255 - c) / ((255 - c) @ (255 - c)))[..., None]  # least squares
    blend = alpha * c + (1 - alpha) * 255
    return int(((alpha[..., 0] >= 0.5) & (np.abs(png - blend).max(-1) <= 3)).sum()) >= min_pixels


@pytest.fixture(scope="module")
def gallery():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    cams = rng.uniform(size=(10, 32, 32)).astype(np.float32)
    true = rng.integers(0, 10, size=10)
    pred = (true + 1) % 10
    confidence = rng.uniform(0.3, 1.0, size=10)
    return images, cams, true, pred, confidence


@pytest.mark.parametrize("with_val", [False, True])
def test_plot_curves(tmp_path, with_val):
    history = _history(with_val)
    fig = plots.plot_curves(history, path=tmp_path / "curves.png", dpi=DPI)
    png = _check_png(tmp_path / "curves.png", 11, 4)
    loss_ax, acc_ax = fig.axes
    splits = ["train", "val", "test"] if with_val else ["train", "test"]
    assert [line.get_label() for line in loss_ax.get_lines()] == splits
    assert acc_ax.get_ylabel() == "accuracy (%)"
    epochs = [r["epoch"] for r in history]
    for split, loss_line, acc_line in zip(splits, loss_ax.get_lines(), acc_ax.get_lines(), strict=True):
        np.testing.assert_array_equal(loss_line.get_xdata(), epochs)
        np.testing.assert_allclose(loss_line.get_ydata(), [r[f"{split}_loss"] for r in history])
        np.testing.assert_array_equal(acc_line.get_xdata(), epochs)
        np.testing.assert_allclose(acc_line.get_ydata(), [100 * r[f"{split}_acc"] for r in history])
        assert acc_line.get_label() == f"{split} ({100 * history[-1][f'{split}_acc']:.2f}%)"
        assert _has_color(png, loss_line.get_color()), split  # the line is drawn in the PNG


@pytest.mark.parametrize("source", ["history", "steps", "steps per epoch"])
def test_plot_lr(tmp_path, source):
    data = _history(False) if source == "history" else (np.arange(100), np.linspace(0.1, 0.0, 100))
    per_epoch = 25 if source == "steps per epoch" else None
    fig = plots.plot_lr(data, path=tmp_path / "lr.png", dpi=DPI, steps_per_epoch=per_epoch)
    png = _check_png(tmp_path / "lr.png", 6, 4)
    assert fig.axes[0].get_xlabel() == ("step" if source == "steps" else "epoch")
    xs, lrs = ([r["epoch"] for r in data], [r["lr"] for r in data]) if source == "history" else data
    if per_epoch:  # the report's lr.png: every step, on curves.png's epoch axis (0 to 4 for 4 epochs of 25 steps)
        xs = np.arange(100) / 25
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), xs)
    np.testing.assert_allclose(line.get_ydata(), lrs)
    assert _has_color(png, line.get_color())


def test_plot_misclassified(tmp_path, gallery):
    images, _, true, pred, confidence = gallery
    fig = plots.plot_misclassified(images / 255.0, true, pred, confidence, CLASSES, path=tmp_path / "m.png", dpi=DPI)
    png = _check_png(tmp_path / "m.png", 5 * plots.PANEL_INCHES, 2 * (plots.PANEL_INCHES + 0.2))
    assert len(fig.axes) == 10
    for i, ax in enumerate(fig.axes):  # row by row, in the given order
        assert ax.get_title() == f"{CLASSES[true[i]]} → {CLASSES[pred[i]]} ({100 * confidence[i]:.0f}%)"
        assert ax.get_images()[0].get_interpolation() == "nearest"
        _assert_shows(png, ax, images[i] / 255.0)
    boxes = [ax.get_position() for ax in fig.axes]
    assert [b.x0 for b in boxes[:5]] == sorted(b.x0 for b in boxes[:5]) and boxes[5].y0 < boxes[0].y0


def test_plot_misclassified_few_or_none(tmp_path, gallery):
    images, _, true, pred, confidence = gallery
    fig = plots.plot_misclassified(images[:3], true[:3], pred[:3], confidence[:3], CLASSES, dpi=DPI)
    assert len(fig.axes) == 3
    assert [ax.get_title().split(" (")[0] for ax in fig.axes] == [
        f"{CLASSES[t]} → {CLASSES[p]}" for t, p in zip(true[:3], pred[:3], strict=True)
    ]
    empty = plots.plot_misclassified(
        images[:0], true[:0], pred[:0], confidence[:0], CLASSES, path=tmp_path / "e.png", dpi=DPI
    )
    png = _check_png(tmp_path / "e.png", 4, 1)
    assert not empty.axes and [t.get_text() for t in empty.texts] == ["no misclassified images"]
    assert (png < 128).all(-1).any()  # the message's dark text is drawn


def test_plot_gradcam(tmp_path, gallery):
    images, cams, true, pred, _ = gallery
    fig = plots.plot_gradcam(
        images, cams, true, pred, CLASSES, layer_label="layer3, 8x8", path=tmp_path / "g.png", dpi=DPI
    )
    png = _check_png(tmp_path / "g.png", 10 * plots.PANEL_INCHES, 2 * (plots.PANEL_INCHES + 0.2) + 0.3)
    assert len(fig.axes) == 20
    # each image beside its overlay: 0.5 * image + 0.5 * the jet colormap of its CAM
    blended = 0.5 * images / 255.0 + 0.5 * matplotlib.colormaps["jet"](cams)[..., :3]
    for i, (image_ax, cam_ax) in enumerate(zip(fig.axes[::2], fig.axes[1::2], strict=True)):
        assert image_ax.get_title() == f"{CLASSES[true[i]]} → {CLASSES[pred[i]]}"
        assert cam_ax.get_title() == "Grad-CAM layer3, 8x8"
        _assert_shows(png, image_ax, images[i] / 255.0)
        _assert_shows(png, cam_ax, blended[i])


def test_plot_confusion(tmp_path):
    rng = np.random.default_rng(1)
    cm = rng.integers(0, 100, size=(10, 10))
    fig = plots.plot_confusion(cm, CLASSES, path=tmp_path / "cm.png", dpi=DPI)
    png = _check_png(tmp_path / "cm.png", 8, 7)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), cm)  # rows true, columns predicted
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(r, c): str(cm[r, c]) for r in range(10) for c in range(10)}  # each count in its cell
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASSES) and ax.get_ylabel() == "true"
    assert ax.get_title() == f"Confusion matrix (accuracy {100 * np.trace(cm) / cm.sum():.2f}%)"
    darkest = matplotlib.colormaps["Blues"](1.0)[:3]
    assert _has_color(png, darkest)  # the largest count's cell is filled


def test_figure_to_array_matches_figure_size():
    fig = plots.plot_lr((np.arange(10), np.linspace(1.0, 0.0, 10)), dpi=DPI)
    array = plots.figure_to_array(fig)
    assert array.dtype == np.uint8
    assert array.shape == (4 * DPI, 6 * DPI, 3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    with Image.open(buffer) as image:
        np.testing.assert_array_equal(array, np.asarray(image.convert("RGB")))  # the same RGB picture
    assert _has_color(array, fig.axes[0].get_lines()[0].get_color())


def test_importing_plots_does_not_import_pyplot():
    code = "import sys, jaxcifar.plots; assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
