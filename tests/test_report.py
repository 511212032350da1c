"""The report: pictures and numbers of a finished run, from Python, the CLI and ``train --report``."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import Normalize
from PIL import Image

from jaxcifar import load_dataset
from jaxcifar.report import FIGURES, ReportOptions, main, make_report


def _image_tags(workdir: Path) -> set[str]:
    """Reads the raw event records (tensorboardX protobufs) and returns the image summary tags."""
    from tensorboardX.proto import event_pb2

    tags: set[str] = set()
    for path in (workdir / "tensorboard").glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 8], "little")
            record = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            tags |= {v.tag for v in event.summary.value if v.HasField("image")}
    return tags


def _packed(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB colors as int64 (...) 0xRRGGBB."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _fraction_shown(png: np.ndarray, image: np.ndarray) -> float:
    """The fraction of the uint8 (H, W, 3) ``image``'s pixels whose color (+-1 per channel) occurs in ``png``.
    A gallery drawn pixel-exact (nearest) holds nearly all of them; another image holds few of them."""
    offsets = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1]), -1).reshape(-1, 3)
    candidates = np.clip(image.reshape(-1, 1, 3).astype(int) + offsets, 0, 255)  # (pixels, 27, 3)
    return float(np.isin(_packed(candidates), np.unique(_packed(png))).any(-1).mean())


def test_train_with_report_writes_pictures_and_tensorboard_images(real_run):
    config, _ = real_run
    workdir = Path(config.workdir)
    pngs = {name: np.asarray(Image.open(workdir / f"{name}.png").convert("RGB")) for name in FIGURES}
    summary = json.loads((workdir / "report.json").read_text())
    # the galleries show the misclassified test images themselves (pixel colors), the matrix its counts' colors
    mistakes = load_dataset(config).test.images[[m["index"] for m in summary["misclassified"]]]
    for name in ("misclassified", "gradcam"):
        shown = [_fraction_shown(pngs[name], image) for image in mistakes]
        assert min(shown) >= 0.9, (name, np.round(shown, 3))
    cm = np.asarray(summary["confusion_matrix"])
    cells = matplotlib.colormaps["Blues"](Normalize(cm.min(), cm.max())(cm), bytes=True)[..., :3]
    assert _fraction_shown(pngs["confusion"], cells) == 1.0
    for name in ("curves", "lr"):  # the first line's color (matplotlib's C0) is drawn
        assert np.isin(_packed(np.uint8([[31, 119, 180]])), _packed(pngs[name])).all(), name
    assert summary["split"] == "test" and summary["images"] == 200
    assert len(summary["misclassified"]) == 10
    confidences = [m["confidence"] for m in summary["misclassified"]]
    assert confidences == sorted(confidences, reverse=True)
    assert np.asarray(summary["confusion_matrix"]).sum() == 200
    assert summary["layer"] == "layer3, 8x8"
    assert _image_tags(workdir) >= {f"report/{name}" for name in FIGURES}


def test_report_cli_on_a_real_run(real_run, tmp_path, capsys):
    config, _ = real_run
    assert main(["--workdir", config.workdir, "--n", "4", "--layer", "layer2", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test: accuracy" in out
    summary = json.loads((tmp_path / "report.json").read_text())
    assert len(summary["misclassified"]) == 4 and summary["layer"] == "layer2, 16x16"
    assert summary["checkpoint"]["epoch"] == 1
    # the same accuracy as the training history's test accuracy (same best checkpoint, same split)
    history = json.loads((Path(config.workdir) / "history.json").read_text())
    assert summary["accuracy"] == pytest.approx(history[0]["test_acc"], abs=1e-6)


def test_report_refuses_layer4_on_32px_and_bad_workdirs(real_run, tmp_path, capsys):
    config, _ = real_run
    with pytest.raises(SystemExit) as exit_info:
        main(["--workdir", config.workdir, "--layer", "layer4", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "layer4 is 4x4 for 32x32 inputs" in err and len(err.splitlines()) == 1
    assert "--allow-small-layer" in err and "allow_small=True" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--workdir", str(tmp_path / "nothing")])
    assert exit_info.value.code == 1 and "nothing: no such folder" in capsys.readouterr().err


def test_make_report_returns_figures(real_run, tmp_path):
    config, _ = real_run
    report = make_report(config.workdir, ReportOptions(n=3), config=config, out_dir=tmp_path)
    assert set(report.figures) == set(FIGURES)
    assert all(path.is_file() for path in report.paths.values())
    assert len(report.summary["misclassified"]) == 3
    # the figures show the summary's mistakes (titles, pixels), its confusion matrix and the run's history
    mistakes, test_images = report.summary["misclassified"], load_dataset(config).test.images
    for ax, m in zip(report.figures["misclassified"].axes, mistakes, strict=True):
        assert ax.get_title() == f"{m['true']} → {m['pred']} ({100 * m['confidence']:.0f}%)"
        np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()), test_images[m["index"]] / 255, atol=1e-6)
    titles = [ax.get_title() for ax in report.figures["gradcam"].axes[::2]]
    assert titles == [f"{m['true']} → {m['pred']}" for m in mistakes]
    confusion = report.figures["confusion"].axes[0].get_images()[0].get_array()
    np.testing.assert_array_equal(confusion, report.summary["confusion_matrix"])
    history = json.loads((Path(config.workdir) / "history.json").read_text())
    (test_loss,) = [line for line in report.figures["curves"].axes[0].get_lines() if line.get_label() == "test"]
    np.testing.assert_allclose(test_loss.get_ydata(), [r["test_loss"] for r in history])


def test_report_with_cam_methods_draws_them_and_scores_them(real_run, tmp_path, capsys):
    config, _ = real_run
    options = ReportOptions(n=3, cam_methods=("gradcam++", "eigencam"))
    report = make_report(config.workdir, options, config=config, out_dir=tmp_path)
    assert (tmp_path / "cam.png").is_file() and report.paths["cam"] == tmp_path / "cam.png"
    axes = report.figures["cam"].axes
    assert len(axes) == 3 * 3 and [ax.get_title() for ax in axes[1:3]] == ["gradcam++", "eigencam"]
    mistakes, test_images = report.summary["misclassified"], load_dataset(config).test.images
    assert [ax.get_title() for ax in axes[::3]] == [f"{m['true']} → {m['pred']}" for m in mistakes]
    np.testing.assert_allclose(axes[3].get_images()[0].get_array(), test_images[mistakes[1]["index"]] / 255, atol=1e-6)
    saved = json.loads((tmp_path / "report.json").read_text())["cam"]
    assert saved["layer"] == "layer3, 8x8" and list(saved["methods"]) == ["gradcam++", "eigencam"]
    metrics = saved["methods"]["gradcam++"]
    names = {"confidence_change", "drop_in_confidence", "increase_in_confidence", "road_morf", "road_lerf"}
    assert set(metrics) == names
    change = metrics["confidence_change"]
    assert len(change["per_image"]) == 3 and change["mean"] == pytest.approx(np.mean(change["per_image"]))
    drops = metrics["drop_in_confidence"]["per_image"]
    assert drops == pytest.approx([max(-c, 0.0) for c in change["per_image"]])
    assert _image_tags(tmp_path) == {"report/cam"}
    with pytest.raises(SystemExit) as exit_info:
        main(["--workdir", config.workdir, "--cam", "gradcam,gradcam+", "--out-dir", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--cam gradcam,gradcam+: unknown 'gradcam+'; available: gradcam, hirescam," in err
    assert not (tmp_path / "bad").exists()


def test_train_with_report_loads_the_data_once(tmp_path, monkeypatch):
    """``run`` with ``--report`` and a numeric LR hands training's dataset to the report: the report's own
    loading (for ``python -m jaxcifar.report``) is a tripwire here, and the report is still written."""
    import jaxcifar.report
    from jaxcifar import Config, run
    from tests.tiny_runs import tiny_run

    def tripwire(config):
        raise AssertionError("the report loaded the dataset again")

    monkeypatch.setattr(jaxcifar.report, "load_dataset", tripwire)
    result = run(Config(**tiny_run(report=True, workdir=str(tmp_path / "run"))), verbose=False)
    assert result.report is not None and (tmp_path / "run" / "report.json").is_file()
