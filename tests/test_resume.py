"""``--resume`` never silently changes a run, a finished run is left alone, one run per workdir (lock).

The finished run is conftest's ``synthetic_run`` (4 epochs), copied per test; every refusal must leave
the copy byte-for-byte as it was.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SYNTHETIC_RUN
from tests.test_user_errors import SYNTHETIC_RUN_ARGS, _keep_signal_handlers, one_error_line, tree_digest  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def run_main(argv, capfd) -> tuple[int, str, str]:
    """Runs ``python -m jaxcifar.train`` in this process; returns (exit code, stdout, stderr)."""
    from jaxcifar.train import main

    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, out + err
    return code, out, err


@pytest.fixture
def finished(synthetic_run, tmp_path) -> Path:
    """A copy of the finished 4-epoch synthetic run."""
    config, _ = synthetic_run
    workdir = tmp_path / "run"
    shutil.copytree(config.workdir, workdir)
    return workdir


@pytest.fixture
def interrupted(finished) -> Path:
    """The run as a crash after epoch 2 leaves it: checkpoints of epochs 3-4 gone."""
    steps_per_epoch = SYNTHETIC_RUN["train_subset"] // SYNTHETIC_RUN["batch_size"]
    for directory in ("checkpoints", "best"):
        for step_dir in (finished / directory).iterdir():
            if step_dir.name.isdigit() and int(step_dir.name) > 2 * steps_per_epoch:
                shutil.rmtree(step_dir)
    return finished


def resume_argv(workdir: Path, *changes: str) -> list[str]:
    return [*SYNTHETIC_RUN_ARGS, "--workdir", str(workdir), "--resume", *changes]


def difference(flag: str, saved: str, now: str) -> str:
    """Regex of one listed difference: ``--flag SAVED vs NOW`` (optionally annotated (saved)/(now))."""
    return rf"{re.escape(flag)} {re.escape(saved)}( \(saved\))? vs {re.escape(now)}( \(now\))?(?![\w.])"


# (flags given on resume, (flag, saved value, value now)): each changes what is trained.
CHANGES = [
    (["--batch-size", "16"], ("--batch-size", "32", "16")),
    (["--train-subset", "256"], ("--train-subset", "512", "256")),
    (["--test-subset", "64"], ("--test-subset", "128", "64")),
    (["--lr", "0.1"], ("--lr", "0.05", "0.1")),
    (["--seed", "1"], ("--seed", "0", "1")),
    (["--epochs", "6"], ("--epochs", "4", "6")),
    (["--momentum", "0.8"], ("--momentum", "0.9", "0.8")),
    (["--augment", "flip"], ("--augment", "crop-flip", "flip")),
    (["--width", "16"], ("--width", "8", "16")),
    (["--model", "resnet34"], ("--model", "resnet18", "resnet34")),
    (["--dtype", "bfloat16"], ("--dtype", "float32", "bfloat16")),
    (["--schedule", "cosine"], ("--schedule", "onecycle", "cosine")),
    (["--weight-decay", "0.001"], ("--weight-decay", "0.0005", "0.001")),
    (["--no-nesterov"], ("--nesterov", "True", "False")),
    (["--label-smoothing", "0.1"], ("--label-smoothing", "0.0", "0.1")),
]


@pytest.mark.parametrize(("changes", "expected"), CHANGES, ids=[c[0][0].lstrip("-") for c in CHANGES])
def test_resume_with_a_changed_field_is_refused(finished, capfd, changes, expected):
    before = tree_digest(finished)
    code, _, err = run_main(resume_argv(finished, *changes), capfd)
    line = one_error_line(err, "train")
    assert code == 2, line
    assert re.search(difference(*expected), line), line
    assert tree_digest(finished) == before


def test_every_changed_field_is_listed_at_once(interrupted, capfd):
    """On an interrupted run too, and all differences in the one line."""
    before = tree_digest(interrupted)
    changes = ["--batch-size", "64", "--seed", "7", "--augment", "none", "--lr", "0.2"]
    code, _, err = run_main(resume_argv(interrupted, *changes), capfd)
    line = one_error_line(err, "train")
    assert code == 2, line
    for expected in [("--batch-size", "32", "64"), ("--seed", "0", "7"), ("--augment", "crop-flip", "none")]:
        assert re.search(difference(*expected), line), (expected, line)
    assert re.search(difference("--lr", "0.05", "0.2"), line), line
    assert tree_digest(interrupted) == before


def _already_finished(code: int, out: str, err: str) -> None:
    assert code == 0, err
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1, out + err
    assert "already finished: 4/4 epochs" in lines[0], lines[0]


def test_finished_run_resumed_with_the_same_config_touches_nothing(finished, capfd):
    before = tree_digest(finished)
    _already_finished(*run_main(resume_argv(finished), capfd))
    assert tree_digest(finished) == before


def test_finished_run_resumed_from_its_saved_config_touches_nothing(finished, capfd):
    """The command the refusal suggests: ``--config WORKDIR/config.json --resume``."""
    before = tree_digest(finished)
    _already_finished(
        *run_main(["--config", str(finished / "config.json"), "--workdir", str(finished), "--resume"], capfd)
    )
    assert tree_digest(finished) == before


def test_resume_accepts_fields_that_do_not_change_the_run(finished, capfd):
    before = {k: v for k, v in tree_digest(finished).items() if k != "config.json"}
    _already_finished(*run_main(resume_argv(finished, "--log-every", "7", "--eval-batch-size", "64"), capfd))
    assert {k: v for k, v in tree_digest(finished).items() if k != "config.json"} == before


def _wait_for(predicate, process: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the owner run ended (exit {process.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_a_live_run_locks_its_workdir(tmp_path, capfd, chaos_env):
    """While a run is alive, another train on its workdir (with or without --resume) ends in one line
    naming the workdir and the owner's pid, exit 1, and leaves the lock to its owner. (A lock left by
    ``kill -9`` is taken over: tests/test_chaos.py.)"""
    from tests.test_chaos import command

    workdir = tmp_path / "run"
    argv = command(workdir, epochs=30)
    owner = subprocess.Popen(argv, cwd=REPO, env=chaos_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = workdir / ".lock"
    try:
        # The owner takes the lock first thing; at the latest before it writes its first epoch.
        _wait_for(lambda: lock.is_file() or (workdir / "history.json").exists(), owner, "the lock or epoch 1")
        assert lock.is_file(), "a live run holds no WORKDIR/.lock"
        _wait_for(lambda: lock.read_text().strip() == str(owner.pid), owner, f".lock to hold pid {owner.pid}", 10)
        for extra in ([], ["--resume"]):
            code, _, err = run_main([*argv[3:], *extra], capfd)
            line = one_error_line(err, "train")
            assert code == 1, line
            assert str(workdir) in line and str(owner.pid) in line, line
            assert lock.read_text().strip() == str(owner.pid)
        assert owner.poll() is None, "the owner ended during the test; the check proved nothing"
    finally:
        owner.kill()
        owner.communicate()


def test_a_stale_lock_file_does_not_block(finished, capfd):
    """A ``.lock`` whose owner is gone (its pid ended) is not a live run."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    (finished / ".lock").write_text(f"{gone.pid}\n")
    before = {k: v for k, v in tree_digest(finished).items() if k != ".lock"}
    _already_finished(*run_main(resume_argv(finished), capfd))
    assert {k: v for k, v in tree_digest(finished).items() if k != ".lock"} == before
