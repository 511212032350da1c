"""Runs that fail safely: divergence stops the run, a full disk ends it with one line, a broken
checkpoint is skipped, run files are strict JSON written atomically, impossible sizes are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import chex
import jax
import optax
import pytest

from jaxcifar import Config, ConfigError, DivergedError, JaxcifarError, checkpoint, fit, sizing
from jaxcifar.errors import CheckpointError
from jaxcifar.files import write_json
from jaxcifar.layout import RunDir, committed_steps
from jaxcifar.loop import TIME_KEYS
from jaxcifar.network import build_model
from jaxcifar.state import create_train_state
from tests.conftest import SYNTHETIC_RUN

# A short run with the synthetic session run's shapes (one compile per test that trains).
SHORT = {**SYNTHETIC_RUN, "epochs": 3, "train_subset": 128}


def _strict_json(path: Path) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverged_loss_stops_the_run_and_saves_nothing_non_finite(tmp_path):
    """A non-finite loss, or a finite one beyond 100 x ln(classes) nats (lr 1e30 gives 5e27 at step 2,
    then nan), stops the run."""
    config = Config(workdir=str(tmp_path / "run"), **{**SHORT, "lr": 1e30, "log_every": 1})
    with pytest.raises(
        DivergedError, match=r"training diverged: the train loss is (nan|[\d.]+e\+\d+) at epoch 1, step"
    ):
        fit(config, verbose=False)
    assert _strict_json(tmp_path / "run" / "history.json") == []
    assert committed_steps(tmp_path / "run" / "checkpoints") == []
    assert committed_steps(tmp_path / "run" / "best") == []


def test_write_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / "h.json"
    write_json(path, [{"loss": float("nan"), "acc": float("inf"), "ok": 1.5}])
    assert _strict_json(path) == [{"loss": None, "acc": None, "ok": 1.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]  # no temporary file left behind


def test_garbage_history_is_named(tmp_path):
    (tmp_path / "history.json").write_text('[{"epoch": 1, "train_lo')
    with pytest.raises(JaxcifarError, match=r"history\.json is not valid JSON"):
        RunDir(tmp_path).read_history()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 4.5}, r"--width: expected an integer, got 4\.5"),
        ({"epochs": 2.5}, r"--epochs: expected an integer"),
        ({"batch_size": True}, r"--batch-size: expected an integer, got True"),
        ({"seed": "0"}, r"--seed: expected an integer, got '0'"),
        ({"seed": -1}, r"--seed must be in \[0, 4294967295\]"),
        ({"workdir": 5}, r"--workdir: expected a string, got 5"),
        ({"data_dir": 7}, r"--data-dir: expected a string, got 7"),
        ({"lr": float("inf")}, r"--lr: must be a finite number, got inf"),
        ({"weight_decay": float("nan")}, r"--weight-decay: must be a finite number, got nan"),
        ({"milestones": [1, "x"]}, r"--milestones: expected a list of integers"),
    ],
)
def test_config_refuses_wrong_types_naming_the_flag(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config(**changes)


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"width": 4.5}')
    with pytest.raises(ConfigError, match=r"c\.json: --width: expected an integer"):
        Config.load(path)


def test_sizes_that_cannot_fit_are_refused_before_any_work():
    devices = jax.devices()[:1]
    available = sizing.device_memory_bytes(devices[0])
    assert available and available > 2**30
    sizing.check_fits(Config(), build_model(Config()), devices)  # the default run fits
    big_eval = Config(eval_batch_size=2_000_000_000)
    with pytest.raises(ConfigError, match=r"--eval-batch-size 2000000000 needs about [\d.]+ TB .* use at most about"):
        sizing.check_fits(big_eval, build_model(big_eval), devices)
    wide = Config(width=4096)
    with pytest.raises(ConfigError, match=r"--width 4096: resnet18 has [\d,]+ parameters and needs about"):
        sizing.check_fits(wide, build_model(wide), devices)
    assert sizing.param_count(build_model(Config())) == 11_173_962  # eval_shape's count: the real one


def test_a_broken_checkpoint_is_named_and_resume_falls_back(synthetic_run, tmp_path, capsys):
    """The newest checkpoint's array files are cut short: resume names it, continues from the one
    before, and ends with the same history and weights as the run that was never broken."""
    config, (state, history) = synthetic_run
    workdir = tmp_path / "run"
    shutil.copytree(config.workdir, workdir)
    newest = workdir / "checkpoints" / str(committed_steps(workdir / "checkpoints")[-1])
    for path in (newest / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64 and "metadata" not in path.name:
            path.write_bytes(path.read_bytes()[:32])
    resumed = fit(config.replace(workdir=str(workdir), resume=True), verbose=False)
    out = capsys.readouterr().out
    assert f"unreadable checkpoint {newest}" in out and "using" in out and "moved the unreadable checkpoint" in out
    timing = set(TIME_KEYS)
    strip = [{k: v for k, v in r.items() if k not in timing} for r in history]
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == strip
    chex.assert_trees_all_equal(resumed.state.params, state.params)
    assert RunDir(workdir).saved_epochs() == config.epochs


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_a_full_disk_stops_the_run_with_one_error_and_a_consistent_history(tmp_path):
    disk = tmp_path / "disk"
    # Room for the first epoch's two checkpoints (latest and best, ~2.3 MB each at width 8), not for a third.
    if not _mount_tmpfs(disk, "6m"):
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        config = Config(workdir=str(disk / "run"), **SYNTHETIC_RUN)
        with pytest.raises(JaxcifarError, match=r"cannot (save checkpoint|write) .*: No space left on device") as error:
            fit(config, verbose=False)
        assert "\n" not in str(error.value)
        history = _strict_json(disk / "run" / "history.json")
        assert isinstance(history, list) and 1 <= len(history) < config.epochs
        saved = committed_steps(disk / "run" / "checkpoints")
        assert all(record["step"] in saved for record in history)  # no epoch listed without its checkpoint
        assert (disk / "run" / "config.json").stat().st_size > 0
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_failed_background_save_fails_every_later_wait(tmp_path, monkeypatch):
    """orbax reports a background write's error once. The Checkpointer keeps it: every later ``wait`` (the
    next save, ``close`` at the end of ``fit``, before history.json is written) raises it again, so a failed
    epoch is never listed as saved. (Seen in CI: the first epoch's latest checkpoint failed on a full disk, the
    best one did not, and the second wait passed, so history.json listed the epoch without its checkpoint.)"""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "512k"):  # smaller than the state (~0.7 MB at width 8)
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        # the free-space check before a save would refuse it at once: let it start, and fail in the background
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 0, 10**9))
        state = create_train_state(build_model(Config(width=8), jax.devices()), optax.sgd(0.1, momentum=0.9), 0)
        saver = checkpoint.Checkpointer(disk / "run", asynchronous=True)
        saver.save(state, {"epoch": 1, "step": 0, "history": []}, is_best=False)
        for _ in range(2):
            with pytest.raises(CheckpointError, match=r"cannot save checkpoint .*/checkpoints/0: No space left on"):
                saver.wait()
        with pytest.raises(CheckpointError, match="No space left on"):
            saver.close()
        assert committed_steps(disk / "run" / "checkpoints") == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("wait_failed", [True, False])
def test_a_write_error_orbax_raises_only_in_close_is_the_one_checkpoint_error(tmp_path, monkeypatch, wait_failed):
    """orbax's metadata store keeps its own future: a full disk can fail ``wait_until_finished`` and then raise
    the same ``OSError`` again from ``CheckpointManager.close`` (seen in CI, where that raw OSError replaced the
    CheckpointError and the run ended in a traceback), or raise it only there. ``close`` turns it into the one
    CheckpointError and still closes the other manager. orbax's two calls are replaced by ones that raise as
    orbax did; the Checkpointer is the real one."""
    saver = checkpoint.Checkpointer(tmp_path / "run", asynchronous=False)
    full = OSError(28, "No space left on device")

    def raise_full() -> None:
        raise full

    if wait_failed:
        monkeypatch.setattr(saver.latest, "wait_until_finished", raise_full)
    monkeypatch.setattr(saver.latest, "close", raise_full)
    closed = []
    best_close = saver.best.close
    monkeypatch.setattr(saver.best, "close", lambda: (closed.append("best"), best_close()))
    with pytest.raises(CheckpointError, match=r"^cannot save checkpoint .*/checkpoints.*: No space left on device$"):
        saver.close()
    assert closed == ["best"]
    with pytest.raises(CheckpointError, match="No space left on device"):
        saver.wait()  # and it stays failed
