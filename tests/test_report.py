"""The report: pictures and numbers of a finished run, from Python, the CLI and ``train --report``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxcifar.report import FIGURES, main, make_report


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


def test_train_with_report_writes_pictures_and_tensorboard_images(real_run):
    config, _ = real_run
    workdir = Path(config.workdir)
    for name in FIGURES:
        image = np.asarray(Image.open(workdir / f"{name}.png"))
        assert image.ndim == 3 and image.std() > 0, name
    summary = json.loads((workdir / "report.json").read_text())
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
    config, result = real_run
    variables = {"params": result.state.params, "batch_stats": result.state.batch_stats}
    report = make_report(config.workdir, n=3, variables=variables, config=config, out_dir=tmp_path)
    assert set(report.figures) == set(FIGURES)
    assert all(path.is_file() for path in report.paths.values())
    assert len(report.summary["misclassified"]) == 3
