"""Fuzz of user errors over the four command lines: one line, the right exit code, nothing written.

Every case calls a CLI's ``main(argv)`` in this process (importing jax in 60 fresh Pythons would cost
minutes) and checks: ``SystemExit`` with the expected code (2: a bad value, 1: bad data, workdir or
checkpoint); stderr is exactly one line ``python -m jaxcifar.X: error: ...``; no traceback anywhere;
every file and folder under the case's ``tmp_path`` (the workdir, config files, cache folders) is
byte-for-byte what it was (the case runs with ``tmp_path`` as its working directory, so a relative
path written by mistake is caught too). A few cases also run as real processes, which catches log
spam, warnings and tracebacks printed at exit.

Train and lr_find cases use a tiny run, so that a value that is wrongly accepted fails quickly: a
tripwire ends the case as soon as a train step is built, and for the values the machine cannot fit
(``--width 30000``, ``--eval-batch-size 2000000000``) as soon as data loading starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tiny_runs import SYNTHETIC_RUN, flags, tiny_run

REPO = Path(__file__).resolve().parents[1]

# The tiny run every train/lr_find case starts from: valid on its own (4 onecycle steps).
TINY = tiny_run(eval_batch_size=32, test_subset=32, log_every=1)
TINY_ARGS = flags(**TINY)
SYNTHETIC_RUN_ARGS = flags(**SYNTHETIC_RUN)  # the conftest run `synthetic_run`, as flags


def tree_digest(root: Path) -> dict[str, str] | None:
    """sha256 of every file under ``root`` by relative path, folders as ``<dir>``; None when absent.

    ``root`` itself may be a file."""
    root = Path(root)
    if not root.exists():
        return None
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        digest[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def one_error_line(err: str, prog: str) -> str:
    """Asserts ``err`` is exactly one non-empty line ``python -m jaxcifar.PROG: error: ...``; returns it."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(f"python -m jaxcifar.{prog}: error: "), line
    return line


class ReachedWork(BaseException):
    """Raised by a tripwire: the command went on to real work instead of refusing its input.

    A BaseException, so that no ``except Exception`` in the CLI can turn it into an error line."""


def tripwire(what: str) -> Callable:
    def trip(*args, **kwargs):
        raise ReachedWork(f"not refused: the command reached {what}")

    return trip


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """The CLIs install SIGINT/SIGTERM handlers; keep this pytest process's own."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    for s, h in handlers.items():
        signal.signal(s, h)
    signal.set_wakeup_fd(wakeup)


@dataclass
class Case:
    """One bad invocation: ``argv`` may use {W} (the workdir), {T} (tmp_path), {F} (the config file)."""

    id: str
    prog: str  # train, report, lr_find, bench
    argv: list[str]
    code: int
    says: str = ""  # a regex the error line must match
    workdir: str = "fresh"  # fresh (absent), run (a copy of a finished run), file, empty, missing, ...
    config: dict | str | None = None  # written to {F}: a dict as JSON, a str as is
    env: dict = field(default_factory=dict)
    heavy: bool = False  # refused before any data is loaded, with the memory it would need
    not_says: str = ""  # a regex the error line must not match


def train(id, argv, code, says="", **kw):
    return Case(id, "train", [*TINY_ARGS, *argv], code, says, **kw)


def config_case(id, changes, says, drop=()):
    values = {k: v for k, v in {**TINY, **changes}.items() if k not in drop}
    return Case(id, "train", ["--config", "{F}", "--workdir", "{W}"], 2, says, config=values)


def lr_find(id, argv, code, says="", **kw):
    return Case(id, "lr_find", [*TINY_ARGS, "--lr-find-steps", "5", *argv], code, says, **kw)


def report(id, argv, code, says="", workdir="run", **kw):
    return Case(id, "report", argv, code, says, workdir=workdir, **kw)


def bench(id, argv, code, says="", **kw):
    return Case(
        id, "bench", ["--width", "4", "--batch-size", "8", "--steps", "1", "--warmup", "0", *argv], code, says, **kw
    )


W = ["--workdir", "{W}"]
CASES = [
    # train: bad flag values (exit 2), named in the message
    train("seed-negative", ["--seed", "-1", *W], 2, "--seed"),
    train("seed-huge", ["--seed", "99999999999999999999999", *W], 2, "--seed"),
    train("eval-batch-size-unfittable", ["--eval-batch-size", "2000000000", *W], 2, "--eval-batch-size", heavy=True),
    train("width-unfittable", ["--width", "30000", *W], 2, "--width", heavy=True),
    train("width-unfittable-below-any-cap", ["--width", "2048", *W], 2, "--width", heavy=True),
    train("lr-inf", ["--lr", "inf", *W], 2, "--lr"),
    train("lr-nan", ["--lr", "nan", *W], 2, "--lr"),
    train("lr-negative", ["--lr", "-1", *W], 2, "--lr"),
    train("weight-decay-inf", ["--weight-decay", "inf", *W], 2, "--weight-decay"),
    train("momentum-inf", ["--momentum", "inf", *W], 2, "--momentum"),
    train("val-fraction-nan", ["--val-fraction", "nan", *W], 2, "--val-fraction"),
    train("pct-start-too-few-steps", ["--pct-start", "0.001", *W], 2, r"--pct-start|step"),
    train("num-devices-absent", ["--num-devices", "4", *W], 2, "--num-devices"),
    train("epochs-0", ["--epochs", "0", *W], 2, "--epochs"),
    train("batch-size-0", ["--batch-size", "0", *W], 2, "--batch-size"),
    train("train-subset-0", ["--train-subset", "0", *W], 2, "--train-subset"),
    train("keep-checkpoints-0", ["--keep-checkpoints", "0", *W], 2, "--keep-checkpoints"),
    train("label-smoothing-1", ["--label-smoothing", "1", *W], 2, "--label-smoothing"),
    train("folder-without-data-dir", ["--data-source", "folder", *W], 2, "--data-dir"),
    train("conv-impl-unknown", ["--conv-impl", "cudnn", *W], 2, "--conv-impl"),
    # train: bad config files (exit 2)
    config_case("config-width-float", {"width": 4.5}, "width"),
    config_case("config-epochs-float", {"epochs": 2.5}, "epochs"),
    config_case("config-workdir-int", {"workdir": 5}, "workdir"),
    config_case("config-data-dir-int", {"data_dir": 7}, "data.dir"),
    config_case("config-batch-size-bool", {"batch_size": True}, "batch.size"),
    config_case("config-seed-str", {"seed": "0"}, "seed"),
    config_case("config-unknown-key", {"widht": 4}, "widht"),
    Case("config-invalid-json", "train", ["--config", "{F}", *W], 2, r"c\.json", config='{"width": 4,'),
    Case("config-not-an-object", "train", ["--config", "{F}", *W], 2, r"c\.json", config="[4, 8]"),
    Case("config-missing-file", "train", ["--config", "{T}/nope.json", *W], 2, "nope.json"),
    # train: bad data and workdirs (exit 1)
    train("workdir-is-a-file", W, 1, "{W}", workdir="file"),
    train("data-dir-missing", ["--data-source", "folder", "--data-dir", "{T}/nope", *W], 1, "{T}/nope"),
    train(
        "cache-dir-is-a-file",
        ["--data-source", "cifar-python", "--download", *W],
        1,
        "cache",
        env={"JAXCIFAR_CACHE_DIR": "{T}/cache"},
        workdir="cache-file",
    ),
    Case("run-without-resume", "train", [*SYNTHETIC_RUN_ARGS, *W], 1, "--resume", workdir="run"),
    Case(
        "resume-garbage-config",
        "train",
        [*SYNTHETIC_RUN_ARGS, *W, "--resume"],
        1,
        "config.json",
        workdir="run-garbage-config",
    ),
    # report
    report("workdir-missing", W, 1, "{W}", workdir="missing"),
    report("workdir-not-a-run", W, 1, "{W}", workdir="empty"),
    report("workdir-is-a-file", W, 1, "{W}", workdir="file"),
    report("garbage-history", W, 1, "history.json", workdir="run-garbage-history"),
    report("out-dir-is-a-file", [*W, "--out-dir", "{T}/out"], 1, "{T}/out", workdir="run-out-file"),
    report("n-0", [*W, "--n", "0"], 2, "--n"),
    report("n-negative", [*W, "--n", "-3"], 2, "--n"),
    report("layer4-small", [*W, "--layer", "layer4"], 2, "--allow-small-layer", not_says="allow_small"),
    report("layer9", [*W, "--layer", "layer9"], 2, "layer9"),
    report("split-val-absent", [*W, "--split", "val"], 1, "val"),
    report("split-bogus", [*W, "--split", "bogus"], 2, "--split"),
    report("tta-bogus", [*W, "--tta", "rotate"], 2, "--tta"),
    report("workdir-and-torch", [*W, "--torch-checkpoint", "{T}/ckpt.pth"], 2, "--torch-checkpoint"),
    report("neither-workdir-nor-torch", [], 2, "--workdir", workdir="fresh"),
    report("torch-only-flag", [*W, "--model", "resnet18"], 2, "--model"),
    # lr_find
    lr_find("workdir-is-a-file", W, 1, "{W}", workdir="file"),
    lr_find("end-inf", ["--lr-find-end", "inf", *W], 2, "--lr-find-end"),
    lr_find("end-nan", ["--lr-find-end", "nan", *W], 2, "--lr-find-end"),
    lr_find("end-below-start", ["--lr-find-start", "1", "--lr-find-end", "0.5", *W], 2, "--lr-find-"),
    lr_find("start-0", ["--lr-find-start", "0", *W], 2, "--lr-find-start"),
    lr_find("steps-2", ["--lr-find-steps", "2", *W], 2, "--lr-find-steps"),
    lr_find("width-unfittable", ["--width", "30000", *W], 2, "--width", heavy=True),
    lr_find("conv-impl-unknown", ["--conv-impl", "cudnn", *W], 2, "--conv-impl"),
    # bench
    bench("batch-size-0", ["--batch-size", "0"], 2, "--batch-size"),
    bench("steps-0", ["--steps", "0"], 2, "--steps"),
    bench("model-unknown", ["--model", "resnet50"], 2, "--model"),
    bench("width-0", ["--width", "0"], 2, "--width"),
    bench("warmup-negative", ["--warmup", "-1"], 2, "--warmup"),
    bench("dtype-unknown", ["--dtype", "float64"], 2, "--dtype"),
    bench("conv-unknown", ["--conv", "cudnn"], 2, "--conv"),
]


def make_workdir(kind: str, tmp_path: Path, run_dir: Callable[[], Path]) -> Path:
    """Builds the case's workdir under ``tmp_path``; returns its path."""
    workdir = tmp_path / "w"
    if kind in ("fresh", "missing"):
        return workdir
    if kind == "file":
        workdir.write_bytes(b"not a folder\n")
    elif kind == "empty":
        workdir.mkdir()
        (workdir / "notes.txt").write_text("not a run\n")
    elif kind == "cache-file":
        (tmp_path / "cache").write_bytes(b"a file where the cache folder should be\n")
    elif kind.startswith("run"):
        shutil.copytree(run_dir(), workdir)
        if kind == "run-garbage-history":
            (workdir / "history.json").write_text('[{"epoch": 1, "train_loss": ')
        elif kind == "run-garbage-config":
            (workdir / "config.json").write_text("{garbage")
        elif kind == "run-out-file":
            (tmp_path / "out").write_bytes(b"a file, not a folder\n")
    else:
        raise AssertionError(kind)
    return workdir


def load_main(prog: str) -> Callable:
    import importlib

    return importlib.import_module(f"jaxcifar.{prog}").main


@pytest.mark.parametrize("case", CASES, ids=[f"{c.prog}-{c.id}" for c in CASES])
def test_user_error(case: Case, tmp_path, request, monkeypatch, capfd):
    def run_dir() -> Path:
        config, _ = request.getfixturevalue("synthetic_run")
        return Path(config.workdir)

    workdir = make_workdir(case.workdir, tmp_path, run_dir)
    if case.config is not None:
        text = case.config if isinstance(case.config, str) else json.dumps(case.config)
        (tmp_path / "c.json").write_text(text)
    fill = {"{W}": str(workdir), "{T}": str(tmp_path), "{F}": str(tmp_path / "c.json")}

    def subst(s: str) -> str:
        for key, value in fill.items():
            s = s.replace(key, value)
        return s

    argv = [subst(a) for a in case.argv]
    for name, value in case.env.items():
        monkeypatch.setenv(name, subst(value))
    monkeypatch.chdir(tmp_path)
    import jaxcifar.setup
    import jaxcifar.steps

    monkeypatch.setattr(jaxcifar.steps, "make_train_step", tripwire("building a train step"))
    if case.heavy:  # run, fit and lr_find load their data in their RunSetup
        monkeypatch.setattr(jaxcifar.setup, "load_dataset", tripwire("data loading"))
    main = load_main(case.prog)
    before = tree_digest(tmp_path)
    capfd.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, out + err
    line = one_error_line(err, case.prog)
    assert exit_info.value.code == case.code, f"exit {exit_info.value.code}, expected {case.code}: {line}"
    if case.says:
        says = case.says
        for key, value in fill.items():
            says = says.replace(key, re.escape(value))
        assert re.search(says, line), f"{says!r} not in: {line}"
    if case.heavy:
        assert re.search(r"memory|\d\s*[KMGTP]i?B\b", line), f"the memory it needs is not said: {line}"
    if case.not_says:
        assert not re.search(case.not_says, line), line
    assert tree_digest(tmp_path) == before, f"files changed under {tmp_path}"


@pytest.mark.parametrize(
    ("changes", "code", "says"),
    [
        # Set up (data loaded, test hook passed), then refused: 1 step is too few for onecycle.
        ({"train_subset": 32}, 2, "--schedule onecycle needs more than"),
        # A whole run: compiled, trained, evaluated, checkpointed (the cheapest model to compile).
        pytest.param({"model": "resnet9"}, 0, "epoch 1/1", marks=pytest.mark.slow),
    ],
    ids=["refused-after-set-up", "whole-run"],
)
def test_main_leaves_signal_handlers_as_it_found_them(tmp_path, capfd, monkeypatch, changes, code, says):
    """``main`` is callable from Python (notebooks, tests): a tiny run through it leaves Ctrl-C and SIGTERM
    to the caller, during the run (seen at the ``after-data`` test hook: the run is set up, its data loaded)
    and after it returns or exits: the caller's handlers and signal wakeup fd, not ``interrupts``' handlers
    that end the process with ``os._exit``."""
    from jaxcifar.testhooks import PAUSE_ENV
    from jaxcifar.train import main

    def callers_handler(signum, frame):
        raise AssertionError("not called: no signal is sent")

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        signal.signal(signum, callers_handler)  # the autouse fixture puts pytest's back
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    gate = tmp_path / "go"
    monkeypatch.setenv(PAUSE_ENV, f"after-data:{gate}")
    during: list[dict] = []

    def look_during_the_run() -> None:  # signal.getsignal works from any thread
        deadline = time.monotonic() + 300
        while not gate.exists() and time.monotonic() < deadline:
            if Path(f"{gate}.reached").exists():
                during.append({s: signal.getsignal(s) for s in signals})
                gate.touch()
            time.sleep(0.01)

    watcher = threading.Thread(target=look_during_the_run, daemon=True)
    watcher.start()
    try:
        try:
            ended = main(flags(**{**TINY, **changes, "workdir": str(tmp_path / "w")}))
        except SystemExit as e:
            ended = e.code
    finally:
        gate.touch()
        watcher.join()
    out, err = capfd.readouterr()
    assert ended == code and says in out + err, out + err
    # It got through the set-up to the hook (after the data), and the handlers there were the caller's.
    assert during == [{s: callers_handler for s in signals}], "the run took over a signal (or never paused)"
    assert all(signal.getsignal(s) is callers_handler for s in signals)
    assert signal.set_wakeup_fd(wakeup) == wakeup


# The same errors as whole processes: exactly one stderr line from start to exit (no warnings, log
# lines or tracebacks printed at exit). Started together: each costs an interpreter and a jax import.
PROCESS_CASES = [
    ("train", [*TINY_ARGS, "--width", "30000", "--workdir", "{T}/w"], {}, 2, "fresh"),
    ("train", [*TINY_ARGS, "--conv-impl", "cudnn", "--workdir", "{T}/w"], {}, 2, "fresh"),
    ("report", ["--workdir", "{T}/w"], {}, 1, "run-garbage-history"),
    ("lr_find", [*TINY_ARGS, "--workdir", "{T}/w"], {}, 1, "file"),
]


def test_user_errors_as_processes(synthetic_run, tmp_path):
    config, _ = synthetic_run
    runs = []
    for i, (prog, argv, env, code, kind) in enumerate(PROCESS_CASES):
        root = tmp_path / str(i)
        root.mkdir()
        make_workdir(kind, root, lambda: Path(config.workdir))
        argv = [a.replace("{T}", str(root)) for a in argv]
        before = tree_digest(root)
        process = subprocess.Popen(
            [sys.executable, "-m", f"jaxcifar.{prog}", *argv],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs.append((prog, argv, code, root, before, process))
    for prog, argv, code, root, before, process in runs:
        out, err = process.communicate(timeout=240)
        assert "Traceback" not in out + err, out + err
        one_error_line(err, prog)
        assert process.returncode == code, (process.returncode, err)
        assert tree_digest(root) == before, f"{prog} {argv} changed files"
