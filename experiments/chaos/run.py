"""Chaos sweep: kill (SIGKILL) or interrupt (SIGINT) a tiny training run at every awkward moment, resume
it with the same command plus --resume until it finishes, and compare with an uninterrupted run.

    python experiments/chaos/run.py [--reps 3] [--out experiments/chaos/output.txt]

Each scenario starts a fresh workdir, waits for its moment by watching the run from outside (stdout,
the orbax temporary folder of a checkpoint being written, history.json), sends the signal, then
resumes. A scenario passes when the final history (without timings) and the final checkpoint's
state (params, BatchNorm statistics, optimizer state, step, RNG) are bit-equal to the reference; for
SIGINT also when the run ended with exit code 130 within 2 s and one stderr line saying what is
saved; for SIGKILL when the killed run's ``.lock`` was left behind and taken over by the resume. A
moment missed because the run was too quick is retried once with 4x the steps per epoch (and its own
reference). Prints one row per scenario, then one JSON line with the totals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.test_chaos import (  # noqa: E402
    RUN,
    Launch,
    checkpoint_tmp_dirs,
    differences,
    history_epochs,
    run_to_end,
    sigint_problems,
    strike,
)

KILL, INT = signal.SIGKILL, signal.SIGINT
# (name, [(signal, moment), ...] struck in successive launches, then resumed to the end)
SCENARIOS = [
    ("kill mid-epoch 2", [(KILL, "mid-epoch:2")]),
    ("kill mid-epoch 3", [(KILL, "mid-epoch:3")]),
    ("kill in checkpoint write 1", [(KILL, "checkpoint-write:1")]),
    ("kill in checkpoint write 2", [(KILL, "checkpoint-write:2")]),
    ("kill in checkpoint write 3", [(KILL, "checkpoint-write:3")]),
    ("kill after history 1", [(KILL, "after-history:1")]),
    ("kill after history 2", [(KILL, "after-history:2")]),
    ("int in cold compile", [(INT, "compile")]),
    ("int in warm compile", [(INT, "compile")]),
    ("int mid-epoch 2", [(INT, "mid-epoch:2")]),
    ("int in checkpoint write 2", [(INT, "checkpoint-write:2")]),
    ("int after history 1", [(INT, "after-history:1")]),
    ("kill mid-epoch 2, then in checkpoint write 3", [(KILL, "mid-epoch:2"), (KILL, "checkpoint-write:3")]),
    ("int in compile, then kill mid-epoch 2", [(INT, "compile"), (KILL, "mid-epoch:2")]),
]


def environment(cache: Path) -> dict[str, str]:
    """The test suite's child environment (tests/conftest.py chaos_env) with this cache folder."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def run_scenario(name, strikes, workdir: Path, reference: Path, env, scratch: Path, changes) -> dict:
    row = {"scenario": name, "train_subset": changes["train_subset"], "strikes": [], "problems": []}
    resume = False
    for sig, moment in strikes:
        launch_env = env
        if name == "int in cold compile":
            launch_env = environment(Path(tempfile.mkdtemp(dir=scratch, prefix="cold-cache-")))
        result = strike(Launch(workdir, launch_env, resume=resume, **changes), moment, sig)
        resume = True
        entry = {
            "signal": result.sig,
            "moment": moment,
            "reached": result.reached,
            "seen": result.evidence,
            "exit": result.returncode,
            "exit_s": None if result.exit_seconds is None else round(result.exit_seconds, 3),
            "stderr": result.stderr[-3:],
            "history_epochs": history_epochs(workdir),
            "tmp_dirs": checkpoint_tmp_dirs(workdir),
        }
        row["strikes"].append(entry)
        if not result.reached:
            row["missed"] = f"{sig.name} {moment}"
            return row
        if sig == INT:
            row["problems"] += [f"{moment}: {p}" for p in sigint_problems(result)]
        else:
            if result.returncode != -KILL:
                row["problems"].append(f"{moment}: exit {result.returncode} after SIGKILL")
            lock = workdir / ".lock"
            held = lock.read_text().strip() if lock.is_file() else None
            entry["stale_lock"] = held == str(result.pid)
            if held != str(result.pid):
                row["problems"].append(f"{moment}: .lock after kill -9 holds {held!r}, not pid {result.pid}")
    launches = run_to_end(workdir, env, resume=True, tries=3, **changes)
    row["resumes"] = [launch.process.returncode for launch in launches]
    for launch in launches:
        bad = [line for line in launch.err if "Traceback" in line or "Segmentation" in line]
        if bad:
            row["problems"].append(f"resume stderr: {bad[0]}")
    if launches[-1].process.returncode != 0:
        row["problems"].append(f"resume ended {launches[-1].process.returncode}: {launches[-1].err[-1:]}")
    else:
        row["problems"] += differences(reference, workdir)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=512, help="training images (32 per step)")
    args = parser.parse_args()
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="jaxcifar-chaos-"))
    env = environment(scratch / "cache")
    references: dict[int, Path] = {}

    def reference(subset: int) -> Path:
        if subset not in references:
            workdir = scratch / f"reference-{subset}"
            launches = run_to_end(workdir, env, resume=False, tries=1, train_subset=subset)
            assert launches[-1].process.returncode == 0, launches[-1].err
            references[subset] = workdir
        return references[subset]

    shown = {**RUN, "train_subset": args.train_subset}
    print(
        "run:",
        " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shown.items()),
        "(4x the train subset on a miss)",
    )
    print(
        f"{'scenario':46} {'rep':>3} {'subset':>6}  {'strikes (signal@moment: exit, seconds)':58} {'resumes':8} verdict"
    )
    rows = []
    for rep in range(1, args.reps + 1):
        for name, strikes in SCENARIOS:
            row = None
            for subset in (args.train_subset, 4 * args.train_subset):
                workdir = scratch / f"{len(rows):03d}"
                shutil.rmtree(workdir, ignore_errors=True)
                row = run_scenario(name, strikes, workdir, reference(subset), env, scratch, {"train_subset": subset})
                if "missed" not in row:
                    break
            row["rep"] = rep
            rows.append(row)
            verdict = "MISSED" if "missed" in row else ("ok" if not row["problems"] else "FAIL")
            row["verdict"] = verdict
            shown = "; ".join(f"{s['signal'][3:]}@{s['moment']}: {s['exit']}, {s['exit_s']}" for s in row["strikes"])
            print(
                f"{name:46} {rep:>3} {row['train_subset']:>6}  {shown:58} {row.get('resumes', '')!s:8} {verdict}"
                + (f"  {' | '.join(row['problems'])[:300]}" if row["problems"] else ""),
                flush=True,
            )
    summary = {
        "scenarios": len(rows),
        "ok": sum(r["verdict"] == "ok" for r in rows),
        "failed": [f"{r['scenario']} (rep {r['rep']}): {r['problems']}" for r in rows if r["verdict"] == "FAIL"],
        "missed": [f"{r['scenario']} (rep {r['rep']}): {r['missed']}" for r in rows if r["verdict"] == "MISSED"],
        "sigint_exit_s_max": max(
            (s["exit_s"] for r in rows for s in r["strikes"] if s["signal"] == "SIGINT" and s["exit_s"] is not None),
            default=None,
        ),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if not summary["failed"] and not summary["missed"] else 1


if __name__ == "__main__":
    sys.exit(main())
