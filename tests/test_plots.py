"""Plots: PNGs of the expected pixel size (figsize * dpi) that are not blank, titles, no pyplot."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
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


def _check_png(path, width_in: float, height_in: float) -> None:
    with Image.open(path) as image:
        assert image.size == (round(width_in * DPI), round(height_in * DPI))
        pixels = np.asarray(image.convert("RGB"), np.float32)
    assert pixels.std() > 0


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
    fig = plots.plot_curves(_history(with_val), path=tmp_path / "curves.png", dpi=DPI)
    _check_png(tmp_path / "curves.png", 11, 4)
    loss_ax, acc_ax = fig.axes
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == (["train", "val", "test"] if with_val else ["train", "test"])
    assert acc_ax.get_ylabel() == "accuracy (%)"


@pytest.mark.parametrize("source", ["history", "steps"])
def test_plot_lr(tmp_path, source):
    data = _history(False) if source == "history" else (np.arange(100), np.linspace(0.1, 0.0, 100))
    fig = plots.plot_lr(data, path=tmp_path / "lr.png", dpi=DPI)
    _check_png(tmp_path / "lr.png", 6, 4)
    assert fig.axes[0].get_xlabel() == ("epoch" if source == "history" else "step")


def test_plot_misclassified(tmp_path, gallery):
    images, _, true, pred, confidence = gallery
    fig = plots.plot_misclassified(images / 255.0, true, pred, confidence, CLASSES, path=tmp_path / "m.png", dpi=DPI)
    _check_png(tmp_path / "m.png", 5 * plots.PANEL_INCHES, 2 * (plots.PANEL_INCHES + 0.2))
    expected = f"{CLASSES[true[0]]} → {CLASSES[pred[0]]} ({100 * confidence[0]:.0f}%)"
    assert fig.axes[0].get_title() == expected
    assert fig.axes[0].get_images()[0].get_interpolation() == "nearest"


def test_plot_misclassified_few_or_none(tmp_path, gallery):
    images, _, true, pred, confidence = gallery
    fig = plots.plot_misclassified(images[:3], true[:3], pred[:3], confidence[:3], CLASSES, dpi=DPI)
    assert len(fig.axes) == 3
    plots.plot_misclassified(images[:0], true[:0], pred[:0], confidence[:0], CLASSES, path=tmp_path / "e.png", dpi=DPI)
    _check_png(tmp_path / "e.png", 4, 1)


def test_plot_gradcam(tmp_path, gallery):
    images, cams, true, pred, _ = gallery
    fig = plots.plot_gradcam(
        images, cams, true, pred, CLASSES, layer_label="layer3, 8x8", path=tmp_path / "g.png", dpi=DPI
    )
    _check_png(tmp_path / "g.png", 10 * plots.PANEL_INCHES, 2 * (plots.PANEL_INCHES + 0.2) + 0.3)
    assert fig.axes[0].get_title() == f"{CLASSES[true[0]]} → {CLASSES[pred[0]]}"
    assert fig.axes[1].get_title() == "Grad-CAM layer3, 8x8"


def test_plot_confusion(tmp_path):
    rng = np.random.default_rng(1)
    cm = rng.integers(0, 100, size=(10, 10))
    fig = plots.plot_confusion(cm, CLASSES, path=tmp_path / "cm.png", dpi=DPI)
    _check_png(tmp_path / "cm.png", 8, 7)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {str(c) for c in cm.ravel()} <= texts


def test_figure_to_array_matches_figure_size():
    fig = plots.plot_lr((np.arange(10), np.linspace(1.0, 0.0, 10)), dpi=DPI)
    array = plots.figure_to_array(fig)
    assert array.dtype == np.uint8
    assert array.shape == (4 * DPI, 6 * DPI, 3)
    assert array.std() > 0


def test_importing_plots_does_not_import_pyplot():
    code = "import sys, jaxcifar.plots; assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
