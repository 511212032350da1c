"""Multi-host for real: two JAX processes (4 CPU devices each) on one machine, started like two hosts of a
pod with ``--distributed`` and ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``.

Always run (a few seconds each, no training): bad set-ups end in one line, without a hang (a busy
coordinator port, a wrong process count, processes started with different flags).

Run only with ``JAXCIFAR_MULTIHOST=1`` (about 3-4 minutes on 2 cores: each training launch starts two
JAX processes whose collectives go through gloo over TCP): the two processes train as one run equal to
one process with 8 devices, process 1 writes nothing of its own (``strace``), a finished run resumed
says so, a ``kill -9`` of either process ends the other within seconds with one line naming it, and
``--resume`` then continues to the uninterrupted run. ``experiments/multihost/run.py`` runs the same on
the shared CIFAR-10 images and records it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jaxcifar import stderr_guard
from tests.tiny_runs import flags, tiny_run

REPO = Path(__file__).resolve().parents[1]
RUN = tiny_run(
    epochs=2,
    train_subset=256,
    lr=0.002,  # small: this tiny net amplifies float-order differences (see test_two_processes_train_as_one_run)
    log_every=1,  # the running train loss of every step in TensorBoard
)
MULTIHOST = os.environ.get("JAXCIFAR_MULTIHOST") == "1"
needs_multihost = pytest.mark.skipif(
    not MULTIHOST,
    reason="multi-process training (minutes): JAXCIFAR_MULTIHOST=1 python -m pytest tests/test_multihost.py",
)
# Every file system change a process makes from Python (all of jaxcifar's writes: JSON, PNG, TensorBoard
# events, the lock; orbax's metadata) is logged by an audit hook that a sitecustomize module installs at
# start-up. orbax's array data is written by tensorstore in C++, out of its sight: experiments/multihost/
# records those with strace (process 1: only its own ocdbt.process_1 folders).
AUDIT = """
import os, sys
_log = open(os.environ["JAXCIFAR_AUDIT_LOG"] + "." + os.environ.get("JAX_PROCESS_ID", "x"), "a", buffering=1)
_root = os.environ["JAXCIFAR_AUDIT_ROOT"]
_writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else (flags or 0) & _writing
        changed = [path] if writes else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.utime", "shutil.rmtree"):
        changed = [args[0]]
    elif event in ("os.rename", "os.link", "os.symlink", "shutil.move", "shutil.copyfile"):
        changed = [args[0], args[1]]
    else:
        return
    for path in changed:
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(path))
            if full.startswith(_root):
                _log.write(event + " " + full + "\\n")
sys.addaudithook(_hook)
"""
# orbax writes a checkpoint collectively: each process its own part, inside the temporary checkpoint folder.
ORBAX_OWN_PART = re.compile(
    r"\.orbax-checkpoint-tmp/state\.orbax-checkpoint-tmp/(array_metadatas|ocdbt)\.?/?process_1$"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(workdir: Path, *extra: str, **changes: object) -> list[str]:
    """Returns the argv of the run in ``workdir`` (``changes`` override RUN's fields), then ``extra``."""
    return [sys.executable, "-m", "jaxcifar.train", *flags(**{**RUN, **changes, "workdir": str(workdir)}), *extra]


def env_for(base: dict[str, str], port: int, process: int, processes: int = 2, devices: int = 4) -> dict[str, str]:
    return {
        **base,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(processes),
        "JAX_PROCESS_ID": str(process),
    }


class Proc:
    """One started process; its stdout and stderr collected by reader threads (lines, with arrival times)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, lines: list[str]) -> None:
        for raw in stream:
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"still running after {timeout} s (a hang); stdout {self.out[-5:]}, stderr {self.err[:80]}")
        for reader in self.readers:
            reader.join(10)
        return code

    def wait_for_line(self, prefix: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.out):
            if self.process.poll() is not None or time.monotonic() > end:
                pytest.fail(f"no line {prefix!r}: stdout {self.out[-5:]}, stderr {self.err[-5:]}")
            time.sleep(0.02)


def launch(base_env: dict[str, str], workdir: Path, *extra: str, processes: int = 2, **changes) -> list[Proc]:
    """Starts the run in ``workdir`` as ``processes`` processes of 4 devices each."""
    port = free_port()
    argv = command(workdir, "--distributed", *extra, **changes)
    return [Proc(argv, env_for(base_env, port, i, processes)) for i in range(processes)]


def finish(procs: list[Proc], timeout: float = 300) -> list[int]:
    return [p.wait(timeout) for p in procs]


def running_losses(workdir: Path) -> dict[int, float]:
    """The ``loss/train_running`` TensorBoard scalars of a run: the epoch's mean train loss so far, per step."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in sorted((workdir / "tensorboard").glob("events*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # records: length (8 bytes), its CRC (4), the event, its CRC (4)
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                if value.tag == "loss/train_running":
                    found[event.step] = value.simple_value
    return found


def metrics(workdir: Path) -> list[dict[str, float]]:
    history = json.loads((workdir / "history.json").read_text())
    return [{k: v for k, v in record.items() if k.endswith(("_loss", "_acc"))} for record in history]


def assert_same_history(a: list[dict[str, float]], b: list[dict[str, float]], rel: float, flips: int = 0) -> None:
    """Equal histories within ``rel``; an accuracy may also differ by ``flips`` predictions of its split."""
    assert len(a) == len(b) == RUN["epochs"]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            images = RUN["train_subset"] if key.startswith("train") else RUN["test_subset"]
            slack = flips / images if key.endswith("_acc") else 0.0
            assert x[key] == pytest.approx(y[key], rel=rel, abs=max(1e-7, slack + 1e-7)), key


def one_line(proc: Proc) -> str:
    lines = [line for line in proc.err if line.strip()]
    assert len(lines) == 1, proc.err
    return lines[0]


# --- bad set-ups: always run ----------------------------------------------------------------------------------


def test_busy_coordinator_port_is_one_line(tmp_path, chaos_env):
    """Process 0 cannot start the coordinator on a port another program listens on: one line, at once."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        proc = Proc(command(tmp_path / "run", "--distributed"), env_for(chaos_env, port, 0))
        code = proc.wait(120)
    assert code == 1
    assert re.match(
        rf"python -m jaxcifar.train: error: --distributed: cannot start the coordinator on port {port} .*"
        "Address already in use",
        one_line(proc),
    )
    assert proc.out == []
    assert not (tmp_path / "run").exists()
    print(f"busy port: {time.monotonic() - started:.1f}s")


def test_wrong_process_count_times_out_in_one_line(tmp_path, chaos_env):
    """JAX_NUM_PROCESSES=3 with 2 processes started: initialize would wait for the third one; both end after
    JAXCIFAR_DISTRIBUTED_INIT_TIMEOUT (here 5 s) with one line (JAX itself would abort with a stack trace)."""
    env = {**chaos_env, "JAXCIFAR_DISTRIBUTED_INIT_TIMEOUT": "5"}
    port = free_port()
    started = time.monotonic()
    procs = [Proc(command(tmp_path / "run", "--distributed"), env_for(env, port, i, processes=3)) for i in range(2)]
    codes = finish(procs, timeout=120)
    assert codes == [1, 1]
    for proc in procs:
        assert "did not answer, or not all 3 processes (JAX_NUM_PROCESSES) joined, within 5 s" in one_line(proc)
        assert proc.out == []
    assert not (tmp_path / "run").exists()
    print(f"wrong count: {time.monotonic() - started:.1f}s")


def test_processes_with_different_configs_refuse_in_one_line(tmp_path, chaos_env):
    """Process 1 started with another --width: every process ends with the same ConfigError (exit code 2),
    found by one collective on the hashes of every config field before any work."""
    port = free_port()
    argv = command(tmp_path / "run", "--distributed")
    procs = [Proc(argv + (["--width", "8"] if i else []), env_for(chaos_env, port, i)) for i in range(2)]
    assert finish(procs, timeout=120) == [2, 2]
    for proc in procs:
        assert one_line(proc) == (
            "python -m jaxcifar.train: error: --distributed: the processes' configs differ: process 1 differs from "
            "process 0 in --width; start every process with the same flags (only --data-dir may differ)"
        )
    assert not (tmp_path / "run").exists()


JAX_POLLED = (
    b"E1126 08:26:30.012092   25049 coordination_service_agent.cc:289] Polled an error from coordination service "
    b"(this can be an error from this or another task).\n"
)
JAX_FATAL = (
    b"F1126 08:04:23.606922   18622 client.h:80] Terminating process because the JAX distributed service detected "
    b"fatal errors. This most likely indicates that another task died. absl::Status: UNAVAILABLE: Failed to send RPC "
    b"to coordination service.\nAdditional GRPC error information\n*** Check failure stack trace: ***\n"
    b"    @     0x7f639d440634  absl::log_internal::LogMessage::SendToLog()\n"
)
GLOO_FATAL = (
    b"terminate called after throwing an instance of 'gloo::EnforceNotMet'\n  what():  [enforce fail at "
    b"external/gloo/gloo/transport/tcp/pair.cc:459] op.preamble.length <= op.nbytes. 36 vs 4. Received data size "
    b"doesn't match expected size.\n"
)
LOST = b"python -m jaxcifar.train: error: --distributed: lost process 0 of 2 (its connection closed ...); ...\n"


@pytest.mark.parametrize(
    "given, shown",
    [
        ([b"a line\n", b"no newline"], b"a line\nno newline"),
        ([JAX_POLLED, LOST], LOST),  # the watchdog's line came second: JAX's is dropped
        ([JAX_POLLED, JAX_FATAL, LOST, b"    @ 0x1\n"], LOST),  # and after JAX's fatal one
        ([JAX_POLLED, 1.0, b"later\n"], JAX_POLLED + b"later\n"),  # an error line alone is kept
        (
            [JAX_POLLED, JAX_FATAL],  # JAX aborted the process before the watchdog could speak: the guard says it
            b"python -m jaxcifar.train: error: --distributed: lost process 0 of 2 (it runs JAX's coordination service; "
            b"JAX ended this process: UNAVAILABLE: Failed to send RPC to coordination service.); continue with the "
            b"same command and --resume on every process\n",
        ),
        ([GLOO_FATAL, LOST], LOST),
        (
            [GLOO_FATAL],  # gloo, inside a collective, got half a message from the dead process and aborted
            b"python -m jaxcifar.train: error: --distributed: a collective across the 2 processes failed: another "
            b"process died or is out of step (gloo ended this process: op.preamble.length <= op.nbytes. 36 vs 4. "
            b"Received data size doesn't match expected size.); continue with the same command and --resume on every "
            b"process\n",
        ),
    ],
)
def test_stderr_guard_leaves_one_line_when_process_0_dies(given, shown):
    """When process 0 dies, JAX's client in the others (or gloo, inside a collective) logs and aborts within
    microseconds of the moment the watchdog hears of it; the stderr guard (a process that forwards stderr)
    keeps only one line."""
    guard = subprocess.Popen(
        stderr_guard.command("python -m jaxcifar.train", 2), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    for part in given:
        if isinstance(part, float):
            time.sleep(part)
        else:
            guard.stdin.write(part)
            guard.stdin.flush()
    guard.stdin.close()
    assert guard.stdout.read() == shown
    assert guard.wait(10) == 0


# --- training: JAXCIFAR_MULTIHOST=1 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(shared_data_dir) -> dict[str, str]:
    """The training runs' data flags: the shared CIFAR-10 JPEGs (the conftest's unpacked part of them)."""
    return {"data_source": "folder", "data_dir": str(shared_data_dir)}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, chaos_env, images):
    """The run as 2 processes x 4 devices with --report (each process's writes audited), and the same run
    as 1 process with 8 devices: (workdir, procs, reference workdir, audit logs, seconds)."""
    root = tmp_path_factory.mktemp("multihost")
    (root / "audit").mkdir()
    (root / "audit" / "sitecustomize.py").write_text(AUDIT)
    audit = {
        **chaos_env,
        "PYTHONPATH": f"{root / 'audit'}{os.pathsep}{chaos_env['PYTHONPATH']}",
        "JAXCIFAR_AUDIT_LOG": str(root / "writes"),
        "JAXCIFAR_AUDIT_ROOT": str(root / "run"),
    }
    started = time.monotonic()
    procs = launch(audit, root / "run", "--report", **images)
    codes = finish(procs)
    seconds = time.monotonic() - started
    assert codes == [0, 0], [p.err[-5:] for p in procs]
    reference = root / "reference"
    env = {**chaos_env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run(command(reference, **images), env=env, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == "devices: 8 x cpu"
    logs = [root / f"writes.{i}" for i in range(2)]
    return root / "run", procs, reference, logs, seconds


@needs_multihost
def test_two_processes_train_as_one_run(two_process_run):
    """Process 0 prints the run (devices line first), process 1 only its devices line; on the shared images
    the losses equal those of one process with 8 devices and the same global batch, within float-order noise:
    only the order of the sums differs (gloo's all-reduce across the processes). A real difference (a batch
    split per process, gradients or BatchNorm statistics averaged per process) shows in the first steps, which
    are asserted to 1e-6 (steps 1-2) and 1e-5 (3-6) relative; after that this tiny net amplifies the noise
    (measured at LR 0.002: on jax 0.10.2 bit-equal up to step 11, then up to 2.5e-5; on jax 0.12, 2.1e-6 at
    step 6, 1e-4 at step 8, 2.4e-3 at step 13, i.e. 1e-3 relative; at LR 0.01, 0.04 by epoch 2; one process
    with 4 devices drifts from one with 8 as much: experiments/multihost/README.md), so the later steps and
    the epochs' losses and accuracies are asserted to 1e-2 only: no blow-up, no divergence."""
    workdir, (p0, p1), reference, _, seconds = two_process_run
    assert p0.out[0] == "devices: 8 x cpu (2 processes x 4; this is process 0)"
    assert p1.out == ["devices: 8 x cpu (2 processes x 4; this is process 1)"]
    assert p0.err == [] and p1.err == []
    assert any(line.startswith("epoch 2/2 | ") for line in p0.out)
    assert any(line.startswith("report: test accuracy") for line in p0.out)
    two, one = running_losses(workdir), running_losses(reference)
    assert sorted(two) == sorted(one) == list(range(1, 17))
    print("running train loss, |2x4 - 1x8| per step:", [f"{abs(two[s] - one[s]):.1e}" for s in sorted(two)])
    for step in two:
        rel = 1e-6 if step <= 2 else 1e-5 if step <= 6 else 1e-2
        assert two[step] == pytest.approx(one[step], rel=rel), step
    # an accuracy counts argmaxes: under that drift one prediction may flip (jax 0.10.2 in a fresh environment of
    # 2026-12-03: train_acc 26/256 vs 27/256 in epoch 1, also on the code before that day's workdir-lock change)
    assert_same_history(metrics(workdir), metrics(reference), rel=1e-2, flips=1)
    print(f"2 processes: {seconds:.1f}s")


@needs_multihost
def test_only_process_0_writes_the_run_files(two_process_run):
    """Process 0 writes config.json, history.json, TensorBoard, the report, timing.json and holds the lock
    (the audit sees them: its positive control); process 1 writes nothing in the workdir but its own part
    of each orbax checkpoint, inside orbax's temporary checkpoint folder, before process 0 commits it."""
    workdir, _, _, logs, _ = two_process_run
    zero, one = ([line.split(" ", 1) for line in log.read_text().splitlines()] for log in logs)
    written = {Path(path).relative_to(workdir).parts[0] for _, path in zero if Path(path) != workdir}
    for name in ("config.json", "history.json", "timing.json", "report.json", "curves.png", "tensorboard", ".lock"):
        assert name in written or any(w.startswith(f".{name}.") for w in written), (name, sorted(written))
    assert one, "the audit saw no write of process 1 at all (not even its part of the checkpoints)"
    stray = [f"{event} {path}" for event, path in one if not ORBAX_OWN_PART.search(path)]
    assert stray == [], stray[:10]


@needs_multihost
def test_finished_run_resumed_says_so(two_process_run, chaos_env, images):
    workdir, *_ = two_process_run
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    procs = launch(chaos_env, workdir, "--resume", "--report", **images)
    assert finish(procs) == [0, 0]
    assert procs[0].out == [
        f"already finished: 2/2 epochs in {workdir}; nothing to do (a longer run is a new run in another --workdir; "
        f"python -m jaxcifar.report --workdir {workdir} writes the report)"
    ]
    assert procs[1].out == []
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


@needs_multihost
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_ends_the_other_in_one_line_and_resume_continues(
    victim, two_process_run, chaos_env, images, tmp_path
):
    """kill -9 of one process during epoch 2: the other ends within seconds with one line naming the lost
    process. Process 1's death: exit code 1 and what is saved, from the watchdog. Process 0's death also ends
    JAX's coordination service, and JAX's client in process 1 then aborts it within microseconds of the
    moment the watchdog hears of it: exit code 1 with the watchdog's line, or (when JAX's abort came first)
    SIGABRT with the stderr guard's line. With victim 1, both processes then --resume and the run ends equal
    to the uninterrupted one."""
    workdir = tmp_path / "run"
    procs = launch(chaos_env, workdir, **images)
    procs[0].wait_for_line("epoch 1/2 ", timeout=300)
    time.sleep(1.0)  # inside epoch 2 (8 steps, about 5 s here)
    procs[victim].process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = procs[1 - victim]
    code = survivor.wait(60)
    ended = time.monotonic() - killed
    procs[victim].wait(10)
    line = one_line(survivor)
    watchdog = "(its connection closed: it ended with an error or interrupt (see its output), or was killed); "
    if code == 1:
        assert line.startswith(f"python -m jaxcifar.train: error: --distributed: lost process {victim} of 2 ("), line
        assert watchdog in line, line
        # epoch 1's checkpoint is committed unless the kill came while both processes were still writing it
        assert line.endswith(
            (f"saved in {workdir}; continue with the same command and --resume", f"nothing to resume in {workdir}")
        ), line
    else:
        # the stderr guard's line: JAX's client aborted, or gloo did inside a collective (half a message)
        assert victim == 0 and code == -signal.SIGABRT, (code, line)
        assert line.startswith("python -m jaxcifar.train: error: --distributed: "), line
        assert (
            "lost process 0 of 2 (it runs JAX's coordination service; JAX ended this process: " in line
            or "a collective across the 2 processes failed: another process died or is out of step (gloo " in line
        ), line
    assert ended < 10, ended
    print(f"victim {victim}: the other ended {ended:.2f}s after the kill, exit code {code}")
    if victim == 0:
        return
    resumed = launch(chaos_env, workdir, "--resume", **images)
    assert finish(resumed) == [0, 0], [p.err[-5:] for p in resumed]
    assert resumed[0].out[0] == "devices: 8 x cpu (2 processes x 4; this is process 0)"
    assert any(line.startswith("resume: epoch ") for line in resumed[0].out)
    uninterrupted, *_ = two_process_run
    assert_same_history(metrics(workdir), metrics(uninterrupted), rel=1e-6)
