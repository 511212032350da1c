"""Chaos: runs killed (``kill -9``) or interrupted (Ctrl-C) at awkward moments resume to the result of an
uninterrupted run, bit for bit; Ctrl-C ends a run within 2 seconds with one line saying what is saved.

The moments are found by watching the run from outside: its stdout ("model:" is printed before the
compile, "compile:" after it), the orbax temporary folder of a checkpoint being written (a name with
``tmp`` under ``checkpoints/``), and ``history.json``. ``experiments/chaos/run.py`` runs the full sweep
(every moment, both signals, repetitions) with the helpers of this file; the suite runs one chain of
four processes: the reference, then Ctrl-C inside the (cold) XLA compile, ``kill -9`` while a checkpoint
is being written, and a resume to the end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxcifar.loop import TIME_KEYS
from tests.tiny_runs import flags, tiny_run

REPO = Path(__file__).resolve().parents[1]

# 3 epochs of 4 steps: the tiny run every chaos launch trains (the same config in every launch).
RUN = tiny_run(epochs=3, keep_checkpoints=5, log_every=4)
TIMING_KEYS = (*TIME_KEYS, "timing")
POLL = 0.002  # seconds between looks at the run


def run_flags(workdir: Path, resume: bool = False, **changes: Any) -> list[str]:
    """Returns the flags of the chaos run in ``workdir`` (``changes`` override RUN's fields)."""
    return flags(**{**RUN, **changes, "workdir": str(workdir), "resume": resume})


def command(workdir: Path, resume: bool = False, **changes: Any) -> list[str]:
    """Returns the argv of the chaos run in ``workdir``: ``python -m jaxcifar.train`` and ``run_flags``."""
    return [sys.executable, "-m", "jaxcifar.train", *run_flags(workdir, resume, **changes)]


class Launch:
    """A running ``python -m jaxcifar.train`` of the tiny run in ``workdir`` (or the command line ``argv``), its
    output collected line by line by reader threads."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        resume: bool = False,
        argv: list[str] | None = None,
        **changes: Any,
    ):
        self.workdir = Path(workdir)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            argv or command(workdir, resume, **changes),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def printed(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in list(self.out))


def history_epochs(workdir: Path) -> int:
    """Epochs listed in ``history.json`` (0 when absent or being replaced)."""
    try:
        return len(json.loads((Path(workdir) / "history.json").read_text()))
    except (OSError, ValueError):
        return 0


def checkpoint_tmp_dirs(workdir: Path) -> list[str]:
    """Names under ``checkpoints/`` of checkpoints being written (orbax temporary folders)."""
    try:
        return sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir() if "tmp" in p.name)
    except OSError:
        return []


def committed_steps(workdir: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
    except OSError:
        return []


@dataclass
class Strike:
    """What happened when ``moment`` was awaited in a launch and ``sig`` sent."""

    moment: str
    sig: str
    reached: bool
    pid: int = 0
    returncode: int | None = None
    exit_seconds: float | None = None  # from the signal to the end of the process
    stderr: list[str] = field(default_factory=list)
    evidence: str = ""  # what the watcher saw when it struck


def wait_for_moment(launch: Launch, moment: str, timeout: float = 240) -> str | None:
    """Polls until ``moment`` is reached; returns a description of what was seen, or None when the run
    ended (or the timeout passed) first.

    Moments: ``compile`` (between the "model:" and "compile:" lines), ``mid-epoch:K`` (half-way through
    epoch K's train steps, K >= 2, timed from epoch K-1's record), ``checkpoint-write:K`` (a checkpoint
    temporary folder exists, from epoch K on), ``after-history:K`` (history.json has just been
    rewritten with epoch K).
    """
    kind, _, arg = moment.partition(":")
    k = int(arg or 1)
    deadline = time.monotonic() + timeout
    seen_tmp: set[str] = set()
    history_seen_at = None
    while launch.alive() and time.monotonic() < deadline:
        if kind == "compile":
            if launch.printed("model:"):
                return None if launch.printed("compile:") else "model: printed, compile: not yet"
        elif kind == "checkpoint-write":
            tmp = checkpoint_tmp_dirs(launch.workdir)
            new = [t for t in tmp if t not in seen_tmp]
            seen_tmp.update(tmp)
            if new and history_epochs(launch.workdir) >= k - 1:
                return f"writing {new[0]} (history lists {history_epochs(launch.workdir)} epochs)"
        elif kind == "after-history":
            if history_epochs(launch.workdir) >= k:
                return f"history.json lists {history_epochs(launch.workdir)} epochs"
        elif kind == "mid-epoch":
            n = history_epochs(launch.workdir)
            if n >= k:
                return None  # epoch k already finished: too late
            if n == k - 1 and history_seen_at is None:
                history_seen_at = time.monotonic()
                records = json.loads((launch.workdir / "history.json").read_text())
                half = 0.5 * float(records[-1].get("train_seconds", 0.5))
            if history_seen_at is not None and time.monotonic() - history_seen_at >= half:
                return f"{half:.2f}s after epoch {k - 1}'s record"
        else:
            raise ValueError(moment)
        time.sleep(POLL)
    return None


def strike(launch: Launch, moment: str, sig: signal.Signals, exit_timeout: float = 60) -> Strike:
    """Waits for ``moment`` in ``launch`` and sends ``sig``; returns what followed."""
    seen = wait_for_moment(launch, moment)
    if seen is None or not launch.alive():
        launch.process.kill()
        launch.wait()
        return Strike(moment, sig.name, False, launch.pid, launch.process.returncode, stderr=list(launch.err))
    sent = time.monotonic()
    launch.process.send_signal(sig)
    try:
        code = launch.process.wait(timeout=exit_timeout)
    except subprocess.TimeoutExpired:
        launch.process.kill()
        code = launch.process.wait()
    exit_seconds = time.monotonic() - sent
    launch.wait()
    return Strike(moment, sig.name, True, launch.pid, code, exit_seconds, list(launch.err), seen)


def sigint_problems(result: Strike) -> list[str]:
    """What is wrong with the end of an interrupted run ([] when nothing): exit 130 within 2 s, one
    stderr line saying what is saved, no traceback or crash."""
    problems = []
    if result.returncode != 130:
        problems.append(f"exit code {result.returncode}, expected 130")
    if result.exit_seconds is None or result.exit_seconds > 2.0:
        problems.append(f"ended {result.exit_seconds and round(result.exit_seconds, 2)}s after SIGINT (limit 2s)")
    text = "\n".join(result.stderr)
    if len(result.stderr) != 1:
        problems.append(f"{len(result.stderr)} stderr lines, expected 1")
    elif not ("saved" in text or "no epoch" in text):
        problems.append("the stderr line does not say what is saved")
    for bad in ("Traceback", "Segmentation fault", "core dumped"):
        if bad in text:
            problems.append(f"{bad!r} on stderr")
    return problems


def run_to_end(workdir: Path, env: dict[str, str], resume: bool, tries: int = 3, **changes: Any) -> list[Launch]:
    """Runs (or resumes) the chaos run until it exits 0; returns the launches."""
    launches = []
    for _ in range(tries):
        launch = Launch(workdir, env, resume=resume, **changes)
        launch.wait()
        launches.append(launch)
        if launch.process.returncode == 0:
            return launches
        resume = True
    return launches


def comparable_history(workdir: Path) -> list[dict[str, Any]]:
    """history.json without timing values (and without timing records)."""
    records = json.loads((Path(workdir) / "history.json").read_text())
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS and not k.endswith("_seconds")}
        for r in records
        if "epoch" in r and r.get("kind", "epoch") == "epoch"
    ]


def final_state(workdir: Path) -> dict[str, np.ndarray]:
    """The newest committed checkpoint's state (params, batch_stats, opt_state, step, rng), flattened to
    ``{path: numpy array}``, restored with orbax without a template."""
    import jax
    import orbax.checkpoint as ocp

    step = committed_steps(workdir)[-1]
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(Path(workdir).absolute() / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def differences(reference: Path, workdir: Path) -> list[str]:
    """Where ``workdir``'s final history and checkpoint differ from ``reference``'s, bit for bit."""
    problems = []
    expected, got = comparable_history(reference), comparable_history(workdir)
    if got != expected:
        problems.append(f"history differs: {got} vs {expected}")
    want, have = final_state(reference), final_state(workdir)
    if sorted(want) != sorted(have):
        problems.append("checkpoint trees differ")
    else:
        unequal = [k for k in want if want[k].dtype != have[k].dtype or want[k].tobytes() != have[k].tobytes()]
        if unequal:
            problems.append(f"{len(unequal)} of {len(want)} checkpoint arrays differ, e.g. {unequal[:3]}")
    return problems


def test_interrupted_and_killed_run_resumes_bit_equal(tmp_path, chaos_env):
    chaos, reference = tmp_path / "chaos", tmp_path / "reference"

    # 1. Ctrl-C inside the first (cold) XLA compile: exit 130 within 2 s, one line, no traceback.
    interrupted = strike(Launch(chaos, chaos_env), "compile", signal.SIGINT)
    assert interrupted.reached, f"the compile was not seen: {interrupted}"
    assert not sigint_problems(interrupted), (sigint_problems(interrupted), interrupted)
    assert "no epoch" in interrupted.stderr[0], interrupted.stderr

    # 2. The uninterrupted reference (it also fills the compilation cache for the launches below).
    ended = run_to_end(reference, chaos_env, resume=False, tries=1)
    assert ended[-1].process.returncode == 0, ended[-1].err
    assert history_epochs(reference) == RUN["epochs"]

    # 3. kill -9 while a checkpoint of epoch 2 or 3 is being written.
    killed = strike(Launch(chaos, chaos_env, resume=True), "checkpoint-write:2", signal.SIGKILL)
    assert killed.reached, f"no checkpoint write was seen: {killed}"
    assert killed.returncode == -signal.SIGKILL
    assert (chaos / ".lock").read_text().strip() == str(killed.pid), "the killed run left no stale .lock"

    # 4. The same command plus --resume, to the end; it takes the stale lock over.
    resumed = run_to_end(chaos, chaos_env, resume=True, tries=1)
    assert resumed[-1].process.returncode == 0, resumed[-1].err
    assert not [line for line in resumed[-1].err if "Traceback" in line]
    assert differences(reference, chaos) == []
