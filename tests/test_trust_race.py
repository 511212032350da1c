"""One run per workdir, whatever the timing; and a command finishes what it promised.

Races made deterministic with the test hook ``JAXCIFAR_TEST_PAUSE=POINT:PATH`` (``jaxcifar.testhooks``): a
process stops at POINT (``after-data``: its data is loaded, nothing compiled; ``report``: training is done,
the report starts) until the test creates PATH. The runs are the chaos run of ``tests/test_chaos.py`` (3
epochs of 4 steps on synthetic data, width 4), as real ``python -m jaxcifar.train`` processes.

- A second fresh run B started while run A holds the workdir, then held after its data load until A was
  interrupted, is refused in one line and changes nothing, whether it is let run to its end or interrupted
  right after its compile; A then resumes to the result of an uninterrupted run, bit for bit.
- ``lr_find`` and ``report`` on a live run are refused in one line and write nothing.
- ``train --report`` interrupted during the report says so; the same command with ``--resume`` writes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jaxcifar.testhooks import PAUSE_ENV
from tests.test_chaos import RUN, Launch, command, differences, history_epochs, run_flags, run_to_end, wait_for_moment
from tests.test_user_errors import _keep_signal_handlers, one_error_line, tree_digest  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = RUN["train_subset"] // RUN["batch_size"]
REPORT_FILES = ("report.json", "curves.png", "lr.png", "misclassified.png", "confusion.png")


def paused(env: dict[str, str], point: str, gate: Path) -> dict[str, str]:
    """``env`` with the test hook: the process waits at ``point`` until ``gate`` exists."""
    return {**env, PAUSE_ENV: f"{point}:{gate}"}


def wait_paused(launch: Launch, gate: Path, timeout: float = 180) -> bool:
    """Waits until ``launch`` waits at its gate (True) or has ended (False)."""
    reached = Path(f"{gate}.reached")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reached.exists():
            return True
        if not launch.alive():
            launch.wait()
            return False
        time.sleep(0.005)
    raise AssertionError(f"pid {launch.pid} neither paused nor ended in {timeout} s: {launch.out} {launch.err}")


def interrupt(launch: Launch) -> int:
    """Sends SIGINT to ``launch`` and returns its exit code."""
    launch.process.send_signal(signal.SIGINT)
    return launch.wait(timeout=60)


def stop(*launches: Launch) -> None:
    for launch in launches:
        if launch.alive():
            launch.process.kill()
        launch.wait()


def keep_epochs(workdir: Path, epochs: int) -> None:
    """Leaves ``workdir`` as a crash after ``epochs`` epochs would: newer checkpoints gone."""
    for directory in ("checkpoints", "best"):
        for step_dir in (workdir / directory).iterdir():
            if step_dir.name.isdigit() and int(step_dir.name) > epochs * STEPS_PER_EPOCH:
                shutil.rmtree(step_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, chaos_env) -> Path:
    """The chaos run, uninterrupted (3 epochs), in its workdir."""
    workdir = tmp_path_factory.mktemp("race-reference") / "run"
    ended = run_to_end(workdir, chaos_env, resume=False, tries=1)
    assert ended[-1].process.returncode == 0, ended[-1].err
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("then", ["compile", "end"])
def test_a_second_run_cannot_take_over_a_live_workdir(reference, tmp_path, chaos_env, then):
    """Run A (paused after its data load), then a fresh run B on A's workdir (with another --lr) held after
    its data load until A has trained an epoch and been interrupted. Then B goes on: to its end, or until
    Ctrl-C right after its compile. B must be refused in one line and leave A's workdir as A left it."""
    workdir, gate_a, gate_b = tmp_path / "run", tmp_path / "go-a", tmp_path / "go-b"
    a = Launch(workdir, paused(chaos_env, "after-data", gate_a))
    b = None
    try:
        assert wait_paused(a, gate_a), f"A ended before its data was loaded: {a.err}"
        b = Launch(workdir, paused(chaos_env, "after-data", gate_b), lr=0.1)
        wait_paused(b, gate_b)  # today's code: B waits there; a fixed one has refused it already
        gate_a.touch()
        assert wait_for_moment(a, "after-history:1"), f"A trained no epoch: {a.err}"
        assert interrupt(a) == 130, a.err
        assert history_epochs(workdir) < RUN["epochs"], "A finished before the interrupt: nothing to resume"
        left_by_a = tree_digest(workdir)

        gate_b.touch()
        if then == "compile":
            deadline = time.monotonic() + 120
            while b.alive() and not b.printed("compile:") and time.monotonic() < deadline:
                time.sleep(0.002)
            if b.alive():
                b.process.send_signal(signal.SIGINT)
        b.wait(timeout=300)
        assert b.process.returncode == 1, f"B was not refused (exit {b.process.returncode}): {b.out} {b.err}"
        assert len(b.err) == 1, b.err
        line = b.err[0]
        assert line.startswith("python -m jaxcifar.train: error: "), line
        assert "in use" in line and str(workdir) in line and str(a.pid) in line, line
        assert tree_digest(workdir) == left_by_a, "B changed A's workdir"
    finally:
        stop(a, *([b] if b else []))

    resumed = run_to_end(workdir, chaos_env, resume=True, tries=1)
    assert resumed[-1].process.returncode == 0, resumed[-1].err
    assert differences(reference, workdir) == []


@pytest.mark.slow
def test_lr_find_and_report_refuse_a_live_run(reference, tmp_path, chaos_env, capfd):
    """A resumed run waits after its data load (it holds its workdir); lr_find and report on that workdir end
    in one line naming its pid, write nothing, and the run then ends as an uninterrupted one."""
    from jaxcifar import lr_find, report

    workdir, gate = tmp_path / "run", tmp_path / "go"
    shutil.copytree(reference, workdir)
    keep_epochs(workdir, 1)
    owner = Launch(workdir, paused(chaos_env, "after-data", gate), resume=True)
    try:
        assert wait_paused(owner, gate), f"the resumed run ended: {owner.err}"
        before = tree_digest(workdir)
        train_flags = run_flags(workdir)
        for prog, main, argv in [
            ("lr_find", lr_find.main, [*train_flags, "--lr-find-steps", "5"]),
            ("report", report.main, ["--workdir", str(workdir)]),
        ]:
            capfd.readouterr()
            with pytest.raises(SystemExit) as ended:
                main(argv)
            line = one_error_line(capfd.readouterr().err, prog)
            assert ended.value.code == 1, line
            assert "in use" in line and str(workdir) in line and str(owner.pid) in line, line
            assert tree_digest(workdir) == before, f"{prog} wrote into a live run's workdir"
        gate.touch()
        assert owner.wait(timeout=300) == 0, owner.err
    finally:
        stop(owner)
    assert differences(reference, workdir) == []


@pytest.mark.slow
def test_report_interrupted_during_train_report_is_written_by_resume(tmp_path, chaos_env):
    """``train --report``, Ctrl-C once training is done and the report has started: the line says the report is
    not written and how to write it; the same command with --resume writes it (and then leaves it alone)."""
    workdir, gate = tmp_path / "run", tmp_path / "go"
    argv = [*command(workdir), "--report"]
    launch = Launch(workdir, paused(chaos_env, "report", gate), argv=argv)
    try:
        assert wait_paused(launch, gate), f"the run never reached its report: {launch.out} {launch.err}"
        assert interrupt(launch) == 130, launch.err
    finally:
        stop(launch)
    assert len(launch.err) == 1, launch.err
    line = launch.err[0]
    assert line.startswith("python -m jaxcifar.train: interrupted: "), line
    said = line.replace(str(workdir), "WORKDIR")  # the test's folder name holds the word "report"
    assert "report not written" in said and "--resume" in said, f"the line does not say the report is missing: {line}"
    assert history_epochs(workdir) == RUN["epochs"]
    assert not (workdir / "report.json").exists()

    resumed = Launch(workdir, chaos_env, argv=[*argv, "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.err
    missing = [name for name in REPORT_FILES if not (workdir / name).is_file()]
    assert not missing, f"--resume did not write {missing}: {resumed.out} {resumed.err}"
    summary = json.loads((workdir / "report.json").read_text())
    assert summary["checkpoint"]["epoch"] >= 1 and summary["images"] == RUN["test_subset"], summary
    assert any(line.startswith("report: ") for line in resumed.out), resumed.out

    written = tree_digest(workdir)
    again = Launch(workdir, chaos_env, argv=[*argv, "--resume"])
    assert again.wait(timeout=300) == 0, again.err
    assert any("already finished" in line for line in again.out), again.out
    assert tree_digest(workdir) == written, "a second --resume changed the finished run's files"


def test_pause_hook_is_inert_without_its_variable(tmp_path, monkeypatch):
    """The hook returns at once without JAXCIFAR_TEST_PAUSE or at another point, and waits at its own."""
    from jaxcifar import testhooks

    monkeypatch.delenv(PAUSE_ENV, raising=False)
    testhooks.pause("after-data")
    gate = tmp_path / "go"
    monkeypatch.setenv(PAUSE_ENV, f"report:{gate}")
    testhooks.pause("after-data")
    assert not Path(f"{gate}.reached").exists()
    threading.Timer(0.2, gate.touch).start()
    t0 = time.monotonic()
    testhooks.pause("report")
    assert Path(f"{gate}.reached").read_text().strip() == str(os.getpid())
    assert time.monotonic() - t0 >= 0.15


# --- quick checks, in this process (the suite's tier) ------------------------------------------------------

# Run in another process: "held" when some process holds FILE's flock exclusively, else "free".
PROBE = """import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held")
"""
# Run in another process: holds DIR/.lock as a live run does (exclusive, its pid inside) until killed.
HOLD = """import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(300)
"""


def lock_state(workdir: Path) -> str:
    """``held``/``free`` as another process sees ``workdir``'s lock; ``absent`` when there is no lock file."""
    path = Path(workdir) / ".lock"
    if not path.exists():
        return "absent"
    probe = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True)
    return probe.stdout.strip()


@pytest.fixture
def holder(tmp_path):
    """A process that holds ``tmp_path/held``'s lock: (workdir, process)."""
    workdir = tmp_path / "held"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield workdir, process
    finally:
        process.kill()
        process.wait()


class Reached(BaseException):
    """Raised where a probe has looked: the command goes no further (no data, no compile)."""


@pytest.mark.parametrize("entry", ["run", "fit"])
def test_the_workdir_is_locked_before_anything_is_decided_about_it(tmp_path, monkeypatch, entry):
    """When ``run``/``fit`` first ask whether the workdir holds a run (``check_resume``), another process
    already finds it locked; and the folders the lock made are gone again when the command ends early."""
    import jaxcifar
    from jaxcifar import Config, loop, pipeline

    seen = []

    def probe(config, rundir, *args, **kwargs):
        seen.append(lock_state(rundir.path))
        raise Reached

    monkeypatch.setattr(pipeline if entry == "run" else loop, "check_resume", probe)
    config = Config(workdir=str(tmp_path / "new" / "run"), **RUN)
    with pytest.raises(Reached):
        getattr(jaxcifar, entry)(config, verbose=False)
    assert seen == ["held"], seen
    assert list(tmp_path.iterdir()) == [], "the command left folders or a lock file behind"


def test_the_lock_is_reentrant_in_its_thread_only(tmp_path):
    from jaxcifar.errors import CheckpointError
    from jaxcifar.workdir import WorkdirLock

    workdir = tmp_path / "w"
    refusals: list[str] = []

    def other_thread() -> None:
        try:
            with WorkdirLock(workdir, shared=True):
                refusals.append("not refused")
        except CheckpointError as e:
            refusals.append(str(e))

    with WorkdirLock(workdir):
        assert (workdir / ".lock").read_text().strip() == str(os.getpid())
        with WorkdirLock(workdir), WorkdirLock(workdir, shared=True):  # run -> fit -> make_report
            assert lock_state(workdir) == "held"
        assert lock_state(workdir) == "held", "an inner release let the lock go"
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        (workdir / "config.json").write_text("{}")  # the command wrote something: its workdir stays
    assert len(refusals) == 1 and "in use" in refusals[0], refusals
    assert lock_state(workdir) == "free"
    assert sorted(p.name for p in workdir.iterdir()) == [".lock", "config.json"]


def test_a_shared_lock_changes_nothing_and_yields_to_a_run(tmp_path, holder):
    from jaxcifar.errors import CheckpointError
    from jaxcifar.workdir import WorkdirLock

    with WorkdirLock(tmp_path / "nothing" / "here", shared=True):
        pass
    assert not (tmp_path / "nothing").exists()
    workdir, process = holder
    with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {process.pid}\)"):
        WorkdirLock(workdir, shared=True).acquire()


def test_lr_find_and_report_refuse_a_held_workdir(holder, capfd):
    """A workdir whose lock a live process holds: lr_find and report end in one line naming it, write nothing."""
    from jaxcifar import lr_find, report

    workdir, process = holder
    before = tree_digest(workdir)
    for prog, main, argv in [
        ("lr_find", lr_find.main, [*run_flags(workdir), "--lr-find-steps", "5"]),
        ("report", report.main, ["--workdir", str(workdir)]),
    ]:
        capfd.readouterr()
        with pytest.raises(SystemExit) as ended:
            main(argv)
        line = one_error_line(capfd.readouterr().err, prog)
        assert ended.value.code == 1, line
        assert f"{workdir} is in use by another run (pid {process.pid})" in line, line
        assert tree_digest(workdir) == before, f"{prog} wrote into a held workdir"


def test_a_finished_run_resumed_with_report_writes_the_missing_report(synthetic_run, tmp_path, capfd):
    """What a ``train --report`` interrupted during its report leaves: every epoch saved, no report. The
    interrupt line says the report is missing; the same command with --resume writes it, once."""
    from jaxcifar.train import main
    from jaxcifar.workdir import describe_saved
    from tests.conftest import SYNTHETIC_RUN
    from tests.test_user_errors import SYNTHETIC_RUN_ARGS

    config, _ = synthetic_run
    workdir, untouched = tmp_path / "run", tmp_path / "untouched"
    shutil.copytree(config.workdir, workdir)
    shutil.copytree(config.workdir, untouched)
    epochs = SYNTHETIC_RUN["epochs"]
    argv = [*SYNTHETIC_RUN_ARGS, "--workdir", str(workdir), "--resume", "--report"]
    capfd.readouterr()
    assert main(argv) == 0
    out = capfd.readouterr().out
    missing = [name for name in REPORT_FILES if not (workdir / name).is_file()]
    assert not missing, f"not written: {missing}\n{out}"
    assert "already finished" in out and "report: test accuracy" in out, out
    said = describe_saved(untouched, epochs=epochs, report=True)  # what Ctrl-C during the report says
    assert "report not written" in said and "--resume" in said, said
    assert "report" not in describe_saved(untouched, epochs=epochs, report=False).replace(str(untouched), "")
    assert "report not written" not in describe_saved(workdir, epochs=epochs, report=True)
    written = tree_digest(workdir)
    assert main(argv) == 0
    out = capfd.readouterr().out
    assert len(out.splitlines()) == 1 and "already finished" in out, out
    assert tree_digest(workdir) == written, "a second --resume changed the finished run's files"


@pytest.mark.parametrize("extra", [[], ["--resume", "--seed", "1"], ["--resume"]], ids=["fresh", "changed", "finished"])
def test_a_command_that_writes_nothing_leaves_the_lock_file_alone(synthetic_run, tmp_path, capfd, extra):
    """Refused (a run is there without --resume; a changed field) or with nothing to do (finished): the lock
    was taken and released, and no byte, not even the pid in ``.lock``, changed."""
    from jaxcifar.train import main
    from tests.test_user_errors import SYNTHETIC_RUN_ARGS

    config, _ = synthetic_run
    workdir = tmp_path / "run"
    shutil.copytree(config.workdir, workdir)
    (workdir / ".lock").write_text("4194305\n")  # a pid no live process has (above Linux's pid_max)
    before = tree_digest(workdir)
    capfd.readouterr()
    try:
        main([*SYNTHETIC_RUN_ARGS, "--workdir", str(workdir), *extra])
    except SystemExit as e:
        assert e.code in (1, 2), e.code
    assert "Traceback" not in capfd.readouterr().err
    assert tree_digest(workdir) == before
    assert lock_state(workdir) == "free"
