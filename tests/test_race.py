"""The race command: time to a target accuracy from the run's own history and timing, mean +- std over seeds."""

from __future__ import annotations

import json
import math

import pytest

from jaxcifar import race
from jaxcifar.config import Config
from jaxcifar.errors import ConfigError


def _history(accs, seconds):
    """Epoch records whose evaluation ends 5 s after each epoch's training (wall seconds from the run's start)."""
    ends = [sum(seconds[: i + 1]) + 5.0 * (i + 1) for i in range(len(seconds))]
    return [
        {"epoch": i + 1, "test_acc": a, "train_seconds": s, "wall_seconds": w}
        for i, (a, s, w) in enumerate(zip(accs, seconds, ends, strict=True))
    ]


def test_run_record_counts_training_seconds_up_to_the_first_epoch_at_the_target():
    record = race.run_record(_history([0.5, 0.86, 0.84, 0.9], [10.0, 11.0, 12.0, 13.0]), {"total": 60.0}, 0.85)
    assert record == {
        "final_acc": 0.9,
        "epoch_to_target": 2,
        "train_seconds_to_target": 21.0,
        "wall_seconds_to_target": 31.0,
        "timing": {"total": 60.0},
    }
    never = race.run_record(_history([0.5, 0.6], [1.0, 1.0]), {}, 0.85)
    assert never["epoch_to_target"] is None and never["train_seconds_to_target"] is None
    assert never["wall_seconds_to_target"] is None


def test_mean_std_is_the_sample_statistics_of_the_present_values():
    assert race.mean_std([1.0, 2.0, None, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert race.mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    assert race.mean_std([None]) == {"mean": None, "std": None, "n": 0}
    runs = [race.run_record(_history([0.9], [s]), {"train": s}, 0.85) for s in (2.0, 4.0)]
    summary = race.summarize(runs)
    assert summary["train_seconds_to_target"] == {"mean": 3.0, "std": math.sqrt(2.0), "n": 2}
    assert summary["reached"] == 2 and summary["timing"]["train"]["mean"] == 3.0
    assert summary["wall_seconds_to_target"] == {
        "cold": {"mean": 7.0, "std": 0.0, "n": 1},
        "warm": {"mean": 9.0, "std": 0.0, "n": 1},
    }


def test_bad_target_and_runs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--target 1.5: must be in \(0, 1\]"):
        race.race(Config(), 1.5, 1, tmp_path)
    with pytest.raises(ConfigError, match="--runs 0: must be >= 1"):
        race.race(Config(), 0.5, 0, tmp_path)


@pytest.mark.slow
def test_race_command_writes_per_run_records_and_their_summary(tmp_path, capsys):
    out = tmp_path / "race"
    argv = ["--model", "resnet9", "--width", "2", "--data-source", "synthetic", "--train-subset", "128",
            "--test-subset", "64", "--batch-size", "32", "--epochs", "2", "--lr", "0.2", "--no-compile-cache",
            "--runs", "2", "--target", "0.05", "--out-dir", str(out)]  # fmt: skip
    assert race.main(argv) == 0
    report = json.loads((out / "race.json").read_text())
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    for r in report["runs"]:
        assert r["epoch_to_target"] == 1 and r["train_seconds_to_target"] > 0  # any accuracy beats 5 %
        assert r["timing"]["total"] >= r["timing"]["train"] > 0
        # from the run's start (run 1: the process's) to the end of epoch 1's evaluation: within the whole run
        assert r["train_seconds_to_target"] < r["wall_seconds_to_target"] <= r["timing"]["total"]
    accs = [r["final_acc"] for r in report["runs"]]
    assert report["summary"]["final_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert report["summary"]["wall_seconds_to_target"]["cold"]["n"] == 1
    out = capsys.readouterr().out
    assert "race: final acc" in out and "s wall cold" in out and "s wall warm" in out
