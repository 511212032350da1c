"""Ctrl-C in a Python script (or a notebook) that calls ``jaxcifar.fit``: the library installs no signal handler
of its own (only the command lines do, ``jaxcifar.interrupts``), so the script gets Python's
``KeyboardInterrupt``, a loop of runs stops at once, and the interrupted run's workdir is not left locked.

The script runs as a real process with Python's default SIGINT handling (a test inside pytest would only see
pytest's handler); the test hook ``JAXCIFAR_TEST_PAUSE`` holds its first run at ``after-data`` so that the
signal arrives at a known moment, inside ``fit``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jaxcifar.testhooks import PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import jaxcifar
from tests.tiny_runs import tiny_run

for seed in (0, 1):
    config = jaxcifar.Config(**tiny_run(epochs=2, seed=seed, workdir=f"{sys.argv[1]}/seed{seed}", resume=True))
    result = jaxcifar.fit(config, verbose=False)
    print(f"done seed {seed}: {len(result.history)} epochs", flush=True)
"""


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to SIG_DFL, as in a terminal. An ignored signal stays ignored
    across exec, and pytest-xdist's workers ignore SIGINT: without this the child would too, and Python then
    installs no KeyboardInterrupt handler (the case of a script started with ``&`` from another script)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """The loop of two runs as a process with Python's default SIGINT handling (start_new_session: the signal
    reaches only it)."""
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "runs")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )


def test_ctrl_c_during_fit_raises_keyboard_interrupt_and_stops_the_loop(tmp_path):
    gate = tmp_path / "go"  # never created: the first run waits at after-data until the signal comes
    env = {**os.environ, PAUSE_ENV: f"after-data:{gate}", "PYTHONPATH": str(REPO)}
    process = _start(tmp_path, env)
    deadline = time.monotonic() + 180
    while not Path(f"{gate}.reached").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached after-data"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"still running 30 s after Ctrl-C; its stdout: {out!r}") from None
    assert process.returncode == -signal.SIGINT, (process.returncode, err[-2000:])  # Python's own exit for it
    assert err.rstrip().endswith("KeyboardInterrupt"), err[-2000:]
    assert "done seed" not in out, out  # the loop did not go on to the next run
    lock = tmp_path / "runs" / "seed0" / ".lock"
    assert not lock.exists(), "the interrupted run left its workdir locked"
