"""A run survives its console, and its endings never depend on printing; names and sizes that cannot work end
in one line.

- An interrupt ends the process even when its line cannot be written (stderr a closed pipe, a workdir name
  that is not UTF-8): before, the watcher thread died in ``os.write`` and SIGTERM/SIGINT were ignored for good.
- A closed or full stdout (``train ... | head -n 2``, ``> /dev/full``) no longer ends a command with a
  traceback: it goes on, without printing, to the same files.
- A workdir or report folder whose name is not UTF-8, or a 300-byte folder name, is refused in one line before
  any work (before: a traceback, or for a non-UTF-8 workdir a failure at the first checkpoint); so is an image
  too large for Pillow to decode, running out of memory, and hosts that loaded different data.

The processes run the tiny synthetic run of ``tests/test_chaos.py``; the in-process cases use the machinery of
``tests/test_user_errors.py`` (one line, exit code, nothing written).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_chaos import RUN, command, history_epochs
from tests.test_multihost import Proc, env_for, free_port
from tests.test_user_errors import SYNTHETIC_RUN_ARGS, Case, lr_find, one_error_line, report, train
from tests.test_user_errors import _keep_signal_handlers as _keep_signal_handlers  # autouse: the CLIs' handlers
from tests.test_user_errors import test_user_error as check_user_error

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m jaxcifar.train"
NOT_UTF8 = os.fsdecode(b"bad\xffname")  # 'bad\udcffname': how Python carries a name that is not UTF-8


def _env(chaos_env: dict[str, str]) -> dict[str, str]:
    return {**chaos_env, "PYTHONPATH": str(REPO)}


# --- an interrupt whose line cannot be written still ends the process -----------------------------------------

INTERRUPTIBLE = """
import signal, sys, time
from jaxcifar import interrupts
interrupts.install("prog")
interrupts.describe(lambda: "epochs 1-2 saved in " + sys.argv[1])
if sys.argv[2] == "watcher":  # only the watcher thread can take the signal (the main thread sleeps on)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
print("ready", flush=True)
time.sleep(30)
print("not ended", flush=True)
"""


@pytest.mark.parametrize("taker", ["watcher", "either"])
@pytest.mark.parametrize("trouble", ["name-not-utf8", "stderr-closed"])
def test_interrupt_ends_the_process_when_its_line_cannot_be_written(tmp_path, trouble, taker):
    workdir = str(tmp_path / NOT_UTF8) if trouble == "name-not-utf8" else str(tmp_path / "run")
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTIBLE, workdir, taker],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if trouble == "stderr-closed":
        process.stderr.close()
    assert process.stdout.readline() == b"ready\n"
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("SIGTERM was ignored: the process still ran 10 s later")
    assert code == 143
    assert process.stdout.read() == b""
    if trouble == "name-not-utf8":
        shown = os.fsencode(workdir).replace(b"\xff", b"\\xff")
        assert process.stderr.read() == b"prog: interrupted: epochs 1-2 saved in " + shown + b"\n"


DISTRIBUTED_END = """
import sys, threading, time
from jaxcifar import interrupts
threading.Thread(target=interrupts.end, args=("lost process 1 of 2; epochs 1-2 saved in " + sys.argv[1], 1)).start()
time.sleep(30)
"""


def test_distributed_end_happens_when_its_line_cannot_be_written(tmp_path):
    """``interrupts.end`` (the watchdog's ending) with stderr a closed pipe and a name that is not UTF-8."""
    process = subprocess.Popen(
        [sys.executable, "-c", DISTRIBUTED_END, str(tmp_path / NOT_UTF8)],
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stderr.close()
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("interrupts.end did not end the process")
    assert code == 1


ENDING = """
import sys
from jaxcifar import interrupts
def broken():
    raise RuntimeError("no workdir")
interrupts.describe(broken)
interrupts.end("--distributed: lost process 1 of 2; " + interrupts.what_is_saved(), 3)
print("not ended", flush=True)
"""


def test_end_says_one_line_with_what_is_saved_and_ends_with_its_code():
    """``interrupts.end`` (the watchdog's ending, public): ``PROG: error: MESSAGE`` (``jaxcifar`` when no command
    installed the module), exit with the code given; ``what_is_saved`` turns a failing description into words."""
    process = subprocess.run(
        [sys.executable, "-c", ENDING], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=60
    )
    assert process.returncode == 3 and process.stdout == b""
    assert process.stderr == (
        b"jaxcifar: error: --distributed: lost process 1 of 2; (RuntimeError while checking what is saved)\n"
    )


@pytest.mark.slow
def test_train_with_a_closed_stderr_ends_on_sigterm(tmp_path, chaos_env):
    """The real command: stderr a closed pipe, SIGTERM right after the ``model:`` line (before the compile)."""
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        command(workdir, epochs=30),
        cwd=REPO,
        env=_env(chaos_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stderr.close()
    for line in process.stdout:
        if line.startswith("model:"):
            break
    else:
        pytest.fail(f"no model: line; exit code {process.wait()}")
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("SIGTERM was ignored: train still ran 30 s later")
    assert code == 143
    assert time.monotonic() - sent < 5
    assert history_epochs(workdir) == 0


# --- a closed or full stdout: the command goes on without printing --------------------------------------------


def _dead_stdout(kind: str) -> tuple[Any, list[tuple[str, str]], int]:
    """A GuardedStream over a closed pipe or /dev/full; returns (it, what its on_drop heard, its descriptor)."""
    from jaxcifar.console import GuardedStream

    if kind == "closed-pipe":
        read_end, fd = os.pipe()
        os.close(read_end)
    else:
        fd = os.open("/dev/full", os.O_WRONLY)
    heard: list[tuple[str, str]] = []
    stream = open(fd, "w", encoding="utf-8", errors="strict", buffering=1)
    return GuardedStream(stream, "stdout", lambda *told: heard.append(told)), heard, fd


@pytest.mark.parametrize(("kind", "reason"), [("closed-pipe", "Broken pipe"), ("full", "No space left on device")])
def test_a_guarded_stream_drops_a_dead_console_and_goes_on(kind, reason):
    from tqdm import tqdm

    guarded, heard, fd = _dead_stdout(kind)
    try:
        tqdm.write("epoch 1/2 | train loss 2.3", file=guarded)  # the run's lines go through tqdm.write
        print("report: wrote curves.png", file=guarded, flush=True)
        guarded.flush()
        assert heard == [("stdout", reason)]  # said once
        assert guarded.dropped == reason
        assert os.path.samefile(f"/proc/self/fd/{fd}", os.devnull)  # C++ and child processes cannot fail on it
    finally:
        guarded.close()


def test_a_guarded_stream_prints_names_that_are_not_utf8(tmp_path):
    from jaxcifar.console import GuardedStream

    path = tmp_path / "out.txt"
    with open(path, "w", encoding="utf-8", errors="strict") as stream:
        guarded = GuardedStream(stream, "stdout")
        print(f"resume: no checkpoint in runs/{NOT_UTF8}", file=guarded)
        assert guarded.dropped is None
    assert path.read_bytes() == b"resume: no checkpoint in runs/bad\\xffname\n"


@pytest.mark.slow
def test_a_finished_run_resumed_with_a_dead_stdout_exits_0(synthetic_run, tmp_path):
    """Real processes: ``--resume`` of a finished run prints one line ("already finished"): into a closed pipe
    and into /dev/full, it ends with exit 0 and the warning line (before: a traceback, exit 1)."""
    config, _ = synthetic_run
    started = {}
    for kind in ("closed-pipe", "full"):
        workdir = tmp_path / kind
        shutil.copytree(config.workdir, workdir)
        argv = [sys.executable, "-m", "jaxcifar.train", *SYNTHETIC_RUN_ARGS, "--workdir", str(workdir), "--resume"]
        stdout = open("/dev/full", "w") if kind == "full" else subprocess.PIPE
        process = subprocess.Popen(
            argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=stdout, stderr=subprocess.PIPE
        )
        if kind == "full":
            stdout.close()
        else:
            process.stdout.close()
        started[kind] = process
    for kind, reason in (("closed-pipe", "Broken pipe"), ("full", "No space left on device")):
        err = started[kind].communicate(timeout=240)[1].decode()
        assert started[kind].returncode == 0, err
        _one_warning(err, reason)
        assert (tmp_path / kind / "history.json").read_bytes() == (Path(config.workdir) / "history.json").read_bytes()


def _one_warning(err: str, reason: str, prog: str = PROG) -> None:
    assert "Traceback" not in err, err
    assert err.splitlines() == [f"{prog}: warning: cannot write to stdout ({reason}); going on without printing to it"]


@pytest.mark.slow
def test_train_piped_into_head_trains_to_the_end(tmp_path, chaos_env):
    """``train ... | head -n 2``: the reader leaves after two lines; the run trains every epoch, exit 0."""
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        command(workdir), cwd=REPO, env=_env(chaos_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    head = [process.stdout.readline() for _ in range(2)]
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=240) == 0, err
    assert head[0].startswith("devices:"), head
    _one_warning(err, "Broken pipe")
    assert history_epochs(workdir) == RUN["epochs"]


@pytest.mark.slow
def test_commands_with_a_full_stdout_finish_their_work(tmp_path, chaos_env):
    """``> /dev/full`` (ENOSPC on every write): train trains every epoch; then report, lr_find and bench (all at
    once) write what they write; each says once on stderr that it could not print. And a report into a folder
    whose name is not UTF-8 works (only checkpoints need UTF-8 paths), its lines showing the name's byte as \\xff."""
    workdir = tmp_path / "run"
    with open("/dev/full", "w") as full:
        process = subprocess.run(
            command(workdir), cwd=REPO, env=_env(chaos_env), stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert process.returncode == 0, process.stderr
    _one_warning(process.stderr, "No space left on device")
    assert history_epochs(workdir) == RUN["epochs"]

    tiny = ["--width", "4", "--batch-size", "32"]
    commands = {
        "report": ["--workdir", str(workdir), "--n", "2"],
        "lr_find": [*command(tmp_path / "lr")[3:], "--lr-find-steps", "5"],
        "bench": [*tiny, "--steps", "1", "--warmup", "0"],
    }
    with open("/dev/full", "w") as full:
        started = {
            prog: subprocess.Popen(
                [sys.executable, "-m", f"jaxcifar.{prog}", *argv],
                cwd=tmp_path,
                env=_env(chaos_env),
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
            )
            for prog, argv in commands.items()
        }
        elsewhere = subprocess.Popen(
            [sys.executable, "-m", "jaxcifar.report", "--workdir", str(workdir), "--out-dir", str(tmp_path / NOT_UTF8)],
            cwd=tmp_path,
            env=_env(chaos_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    for prog, process in started.items():
        err = process.communicate(timeout=240)[1]
        assert process.returncode == 0, (prog, err)
        _one_warning(err, "No space left on device", f"python -m jaxcifar.{prog}")
    assert json.loads((workdir / "report.json").read_text())["images"] == RUN["test_subset"]
    assert (tmp_path / "lr" / "lr_find.json").is_file()
    out, err = elsewhere.communicate(timeout=240)
    assert (elsewhere.returncode, err) == (0, b"")
    named = os.fsencode(tmp_path / NOT_UTF8 / "curves.png")  # as the name's bytes, or escaped (a strict console)
    assert named in out or named.replace(b"\xff", b"\\xff") in out, out
    assert json.loads((tmp_path / NOT_UTF8 / "report.json").read_text())["images"] == RUN["test_subset"]


# --- names, images and sizes that cannot work: one line -------------------------------------------------------

W = ["--workdir", "{W}"]
LONG = "a" * 300  # one folder name of 300 bytes: more than the 255 that file systems allow
CASES = [
    train("workdir-not-utf8", ["--workdir", f"{{T}}/{NOT_UTF8}"], 2, r"--workdir .*/bad\\xffname: .*not valid UTF-8"),
    train("workdir-name-too-long", ["--workdir", f"{{T}}/{LONG}"], 2, r"--workdir: the name a+\.\.\. is 300 bytes"),
    train(
        "data-dir-name-too-long",
        ["--data-source", "folder", "--data-dir", f"{{T}}/{LONG}", *W],
        2,
        r"--data-dir: the name a+\.\.\. is 300 bytes",
    ),
    lr_find("workdir-not-utf8", ["--workdir", f"{{T}}/{NOT_UTF8}"], 2, r"--workdir .*bad\\xffname: .*not valid UTF-8"),
    report("workdir-name-too-long", ["--workdir", f"{{T}}/{LONG}"], 2, "--workdir: the name a+... is 300", "fresh"),
    report("out-dir-name-too-long", [*W, "--out-dir", f"{{T}}/{LONG}"], 2, "--out-dir: the name a+... is 300 bytes"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.prog}-{c.id}" for c in CASES])
def test_unusable_names_are_refused_in_one_line(case, tmp_path, request, monkeypatch, capfd):
    check_user_error(case, tmp_path, request, monkeypatch, capfd)


def test_report_of_a_run_renamed_to_a_name_not_utf8_is_refused(synthetic_run, tmp_path, request, monkeypatch, capfd):
    """A finished run whose folder was renamed to a name that is not UTF-8 (orbax cannot restore from it)."""
    config, _ = synthetic_run
    shutil.copytree(config.workdir, tmp_path / NOT_UTF8)
    case = report(
        "workdir-not-utf8", ["--workdir", f"{{T}}/{NOT_UTF8}"], 2, r"bad\\xffname: .*not valid UTF-8", "fresh"
    )
    check_user_error(case, tmp_path, request, monkeypatch, capfd)


def png_header(width: int, height: int) -> bytes:
    """A PNG file that declares ``width`` x ``height`` gray pixels (its pixel data is empty: Pillow reads the
    size, and refuses a decompression bomb, before it decodes anything)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_too_large_to_decode_is_named_in_one_line(tmp_path, request, monkeypatch, capfd):
    """A 20000 x 20000 PNG among 32 x 32 ones: PIL's DecompressionBombError, which is no OSError."""
    from PIL import Image

    for split in ("train", "test"):
        for k in range(10):
            folder = tmp_path / "data" / split / f"class{k}"
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (k * 20, 0, 0)).save(folder / "0.png")
    (tmp_path / "data" / "train" / "class3" / "1.png").write_bytes(png_header(20000, 20000))
    argv = ["--data-source", "folder", "--data-dir", "{T}/data", "--width", "4", "--batch-size", "4", *W]
    says = r"train/class3/1\.png: unreadable image: too many pixels to decode safely \(DecompressionBombError"
    check_user_error(Case("image-too-large", "train", argv, 1, says), tmp_path, request, monkeypatch, capfd)


def test_running_out_of_memory_ends_in_one_line(capfd):
    """A real XLA RESOURCE_EXHAUSTED (an allocation of 10^14 bytes) inside a command's body."""
    import jax.numpy as jnp

    from jaxcifar import cli

    def body() -> int:
        jnp.zeros((10**14,), jnp.uint8).block_until_ready()
        return 0

    with pytest.raises(SystemExit) as exit_info:
        cli.run_command("prog", body, lambda: "nothing saved")
    assert exit_info.value.code == 1
    out, err = capfd.readouterr()
    assert out == ""
    assert err == (
        "prog: error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 100000000000000 bytes): more than "
        "this process can have; free memory for it, or run it where more is free\n"
    )


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as Linux counts it")
def test_a_run_that_does_not_fit_the_memory_limit_ends_in_one_line(tmp_path, chaos_env):
    """The estimate (``jaxcifar.sizing``) takes the host's RAM; ``ulimit -v 3000000`` (KiB) allows less: width 8,
    batch 2048 needs a 2 GB buffer at its first step, RESOURCE_EXHAUSTED (after the compile). One line, exit 1,
    and the workdir as a run that saved nothing."""
    argv = command(tmp_path / "run", width=8, train_subset=2048, batch_size=2048, schedule="constant")
    limited = ["/bin/sh", "-c", 'ulimit -v 3000000 && exec "$@"', "sh", *argv]  # no preexec_fn: no fork under JAX
    process = subprocess.run(limited, cwd=REPO, env=_env(chaos_env), capture_output=True, text=True, timeout=300)
    assert process.returncode == 1, process.stderr
    assert "Traceback" not in process.stderr
    line = one_error_line(process.stderr, "train")
    assert "out of memory (RESOURCE_EXHAUSTED" in line and "try a smaller --batch-size (now 2048)" in line, line
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == []


# --- hosts that loaded different data -------------------------------------------------------------------------


def test_data_mismatch_names_the_processes_and_the_split():
    from jaxcifar.distributed import data_fingerprint, data_mismatch

    images = np.zeros((6, 32, 32, 3), np.uint8)
    labels = np.arange(6, dtype=np.int32)
    same = data_fingerprint(images, labels)
    assert same.dtype == np.int32 and same.shape == (6,)
    assert data_mismatch("the train split", np.stack([same, same, same])) is None
    changed = images.copy()
    changed[4, 1, 2, 0] = 1
    other = data_fingerprint(changed, labels)
    fewer = data_fingerprint(images[:5], labels[:5])
    message = data_mismatch("the train split", np.stack([same, other, fewer]))
    assert message == (
        "--distributed: the processes hold different data for the train split: process 1, 2 loaded other images or "
        "labels than process 0 (images process 0: 6, process 1: 6, process 2: 5); every process must load the same "
        "data: give every host the same files (--data-dir may differ, its contents may not)"
    )
    assert data_mismatch("x", np.stack([same, data_fingerprint(images, labels[::-1].copy())])) is not None


@pytest.mark.slow
def test_processes_with_different_data_refuse_in_one_line(tmp_path, chaos_env):
    """Two processes (one host each, --data-dir may differ) whose folders differ in one pixel of one image: both
    end with the same one line (exit 1) instead of 657 lines of arrays, before the workdir is made."""
    from PIL import Image

    roots = []
    for host in range(2):
        root = tmp_path / f"host{host}"
        for split in ("train", "test"):
            for k in range(10):
                folder = root / split / f"class{k}"
                folder.mkdir(parents=True)
                for i in range(4 if split == "train" else 1):
                    pixels = np.full((32, 32, 3), 10 * k + i, np.uint8)
                    if host == 1 and (split, k, i) == ("train", 3, 2):
                        pixels[0, 0, 0] += 1
                    Image.fromarray(pixels).save(folder / f"{i}.png")
        roots.append(root)
    port = free_port()
    argv = [sys.executable, "-m", "jaxcifar.train", "--distributed", "--data-source", "folder", "--width", "4"]
    argv += ["--batch-size", "8", "--eval-batch-size", "8", "--epochs", "1", "--workdir", str(tmp_path / "run")]
    procs = [Proc([*argv, "--data-dir", str(root)], env_for(_env(chaos_env), port, i)) for i, root in enumerate(roots)]
    codes = [p.wait(180) for p in procs]
    for proc in procs:
        lines = [line for line in proc.err if line.strip()]
        assert lines == [
            f"{PROG}: error: --distributed: the processes hold different data for the train split: process 1 loaded "
            "other images or labels than process 0 (images process 0: 40, process 1: 40); every process must load "
            "the same data: give every host the same files (--data-dir may differ, its contents may not)"
        ], proc.err[:20]
    assert codes == [1, 1]
    assert not (tmp_path / "run").exists()
