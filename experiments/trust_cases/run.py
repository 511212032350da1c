"""Runs the user-error and interrupt cases of issue 11 against a checkout and prints a table.

Each case is a real `python -m jaxcifar.X ...` process run from the checkout given by --repo (so the
same script measures the code before and after a change: point --repo at a `git worktree` of the
older commit). For each case it records the exit code, how many lines the process wrote to stderr,
whether a Python traceback or a crash appeared, the seconds it took, and whether a finished run's
workdir (built once, with the checkout's own code) changed byte for byte.

    python experiments/trust_cases/run.py --repo . --data-dir /tmp/cifar --out after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--data-source", "synthetic", "--width", "4", "--batch-size", "32", "--train-subset", "128"]
TINY += ["--test-subset", "64"]


def tree_hash(path: Path) -> str:
    """sha256 over every file's relative path and bytes below ``path`` ('' when absent)."""
    if not path.exists():
        return ""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def run(repo: Path, module: str, args: list[str], env: dict[str, str], timeout: float, sigint_after: float | None):
    """Runs one command; returns (exit code or 'timeout', stderr text, seconds)."""
    full_env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1", **env}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=repo,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if sigint_after is not None:
            try:
                proc.wait(timeout=sigint_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                start = time.perf_counter()  # for an interrupt: seconds from the signal to the exit
        _, err = proc.communicate(timeout=timeout)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        code = "timeout"
    return code, err, time.perf_counter() - start


def cases(tmp: Path, data_dir: str) -> list[dict]:
    """The cases: name, module, argv, environment, expected exit code (after the change)."""
    run_dir = str(tmp / "run")
    a_file = tmp / "a_file"
    a_file.write_text("not a folder\n")
    empty = tmp / "empty"
    empty.mkdir()
    bad_tar = tmp / "cifar-10-python.tar.gz"
    bad_tar.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(2000))
    configs = {}
    for name, body in {
        "width_float": '{"width": 4.5}',
        "epochs_float": '{"epochs": 2.5, "data_source": "synthetic", "width": 4}',
        "workdir_int": '{"workdir": 5}',
        "data_dir_int": '{"data_dir": 7}',
        "batch_size_bool": '{"batch_size": true}',
        "seed_string": '{"seed": "0"}',
        "garbage": '{"width": ',
    }.items():
        path = tmp / f"{name}.json"
        path.write_text(body)
        configs[name] = str(path)
    garbage_run = tmp / "garbage_history_run"
    fresh = iter(range(1000))

    class Fresh:  # a new, absent workdir for every case that names one: no case sees another's leftovers
        def __str__(self) -> str:
            return str(tmp / f"fresh-{next(fresh)}")

    out = Fresh()
    c = [
        ("train --seed -1", "jaxcifar.train", [*TINY, "--seed", "-1", "--workdir", str(out)], {}, 2),
        ("train --seed 1e20 (int)", "jaxcifar.train", [*TINY, "--seed", "9" * 23, "--workdir", str(out)], {}, 2),
        ("train --workdir FILE", "jaxcifar.train", [*TINY, "--workdir", str(a_file)], {}, 1),
        *[
            (f"train --config {name}", "jaxcifar.train", ["--config", path, "--workdir", str(out)], {}, 2)
            for name, path in configs.items()
        ],
        (
            "train --eval-batch-size 2e9",
            "jaxcifar.train",
            [*TINY, "--eval-batch-size", "2000000000", "--workdir", str(out)],
            {},
            2,
        ),
        ("train --width 30000", "jaxcifar.train", [*TINY, "--width", "30000", "--workdir", str(out)], {}, 2),
        ("train --lr inf", "jaxcifar.train", [*TINY, "--lr", "inf", "--workdir", str(out)], {}, 2),
        ("train --weight-decay inf", "jaxcifar.train", [*TINY, "--weight-decay", "inf", "--workdir", str(out)], {}, 2),
        (
            "train --lr 1e30 (diverges)",
            "jaxcifar.train",
            [*TINY, "--lr", "1e30", "--epochs", "2", "--workdir", str(out)],
            {},
            1,
        ),
        (
            "train --num-devices 4 (1 CPU)",
            "jaxcifar.train",
            [*TINY, "--num-devices", "4", "--workdir", str(out)],
            {},
            2,
        ),
        ("train --pct-start 0.001", "jaxcifar.train", [*TINY, "--pct-start", "0.001", "--workdir", str(out)], {}, 2),
        ("train --data-dir missing", "jaxcifar.train", ["--data-dir", str(tmp / "nope"), "--workdir", str(out)], {}, 1),
        (
            "train --data-dir DIR/train",
            "jaxcifar.train",
            ["--data-dir", f"{data_dir}/train", "--workdir", str(out)],
            {},
            1,
        ),
        ("train --data-dir EMPTY", "jaxcifar.train", ["--data-dir", str(empty), "--workdir", str(out)], {}, 1),
        (
            "train --data-dir corrupt tarball",
            "jaxcifar.train",
            ["--data-dir", str(bad_tar), "--workdir", str(out)],
            {},
            1,
        ),
        (
            "train JAXCIFAR_XLA_CPU_CONV=bogus",
            "jaxcifar.train",
            [*TINY, "--workdir", str(out)],
            {"JAXCIFAR_XLA_CPU_CONV": "bogus"},
            2,
        ),
        (
            "train JAXCIFAR_CACHE_DIR=FILE --download",
            "jaxcifar.train",
            ["--data-source", "cifar-python", "--download", "--workdir", str(out)],
            {"JAXCIFAR_CACHE_DIR": str(a_file)},
            1,
        ),
        (
            "resume P --batch-size 64",
            "jaxcifar.train",
            [*TINY, "--epochs", "2", "--workdir", run_dir, "--resume", "--batch-size", "64"],
            {},
            2,
        ),
        (
            "resume P --lr 0.05",
            "jaxcifar.train",
            [*TINY, "--epochs", "2", "--workdir", run_dir, "--resume", "--lr", "0.05"],
            {},
            2,
        ),
        (
            "resume P --epochs 3 (extend)",
            "jaxcifar.train",
            [*TINY, "--epochs", "3", "--workdir", run_dir, "--resume"],
            {},
            2,
        ),
        (
            "resume P, same config (finished)",
            "jaxcifar.train",
            [*TINY, "--epochs", "2", "--workdir", run_dir, "--resume"],
            {},
            0,
        ),
        ("P again without --resume", "jaxcifar.train", [*TINY, "--epochs", "2", "--workdir", run_dir], {}, 1),
        ("report --n 0", "jaxcifar.report", ["--workdir", run_dir, "--n", "0"], {}, 2),
        ("report --layer layer4", "jaxcifar.report", ["--workdir", run_dir, "--layer", "layer4"], {}, 2),
        ("report --out-dir FILE", "jaxcifar.report", ["--workdir", run_dir, "--out-dir", str(a_file)], {}, 1),
        ("report --workdir missing", "jaxcifar.report", ["--workdir", str(tmp / "nope")], {}, 1),
        ("report garbage history.json", "jaxcifar.report", ["--workdir", str(garbage_run)], {}, 1),
        ("report --split val (no val)", "jaxcifar.report", ["--workdir", run_dir, "--split", "val"], {}, 1),
        ("lr_find --workdir FILE", "jaxcifar.lr_find", [*TINY, "--workdir", str(a_file)], {}, 1),
        (
            "lr_find --lr-find-end inf",
            "jaxcifar.lr_find",
            [*TINY, "--lr-find-end", "inf", "--workdir", str(out)],
            {},
            2,
        ),
        ("bench --batch-size 0", "jaxcifar.bench", ["--batch-size", "0"], {}, 2),
        ("bench --width 30000", "jaxcifar.bench", ["--width", "30000"], {}, 2),
    ]
    keys = ("name", "module", "args", "env", "expected")
    listed = [dict(zip(keys, case, strict=True)) for case in c]
    interrupts = [
        ("train Ctrl-C at 6 s (compile)", "jaxcifar.train", [*TINY, "--epochs", "2", "--workdir", str(tmp / "i")], 6),
        ("train Ctrl-C at 1 s (imports)", "jaxcifar.train", [*TINY, "--workdir", str(tmp / "j")], 1),
        ("report Ctrl-C at 6 s", "jaxcifar.report", ["--workdir", run_dir, "--out-dir", str(tmp / "r")], 6),
        ("lr_find Ctrl-C at 6 s", "jaxcifar.lr_find", [*TINY, "--workdir", str(tmp / "l")], 6),
        ("bench Ctrl-C at 6 s", "jaxcifar.bench", ["--width", "4", "--batch-size", "8"], 6),
    ]
    for name, module, args, after in interrupts:
        listed.append({"name": name, "module": module, "args": args, "env": {}, "expected": 130, "sigint": after})
    return listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="The checkout to run (its jaxcifar package).")
    parser.add_argument("--data-dir", required=True, help="The unpacked shared CIFAR-10 JPEG folders.")
    parser.add_argument("--out", help="Write the results as JSON here.")
    parser.add_argument("--timeout", type=float, default=120, help="Seconds before a case counts as a hang.")
    parser.add_argument("--only", nargs="+", help="Run only the cases whose name contains one of these texts.")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="trust-cases-"))
    try:
        run_dir = tmp / "run"
        code, err, seconds = run(
            repo, "jaxcifar.train", [*TINY, "--epochs", "2", "--workdir", str(run_dir)], {}, 600, None
        )
        assert code == 0, err
        shutil.copytree(run_dir, tmp / "pristine")
        shutil.copytree(run_dir, tmp / "garbage_history_run")
        (tmp / "garbage_history_run" / "history.json").write_text('[{"epoch": 1, "train_lo')
        before = tree_hash(run_dir)
        results = []
        print(
            f"{'case':44} {'expected':>8} {'exit':>8} {'stderr lines':>12} {'traceback':>9} {'P changed':>9} {'s':>6}"
        )
        for case in cases(tmp, args.data_dir):
            if args.only and not any(text in case["name"] for text in args.only):
                continue
            code, err, seconds = run(repo, case["module"], case["args"], case["env"], args.timeout, case.get("sigint"))
            lines = [line for line in err.splitlines() if line.strip()]
            changed = tree_hash(run_dir) != before
            if changed:  # restore the finished run for the next case
                shutil.rmtree(run_dir)
                shutil.copytree(tmp / "pristine", run_dir)
            row = {
                "case": case["name"],
                "expected": case["expected"],
                "exit": code,
                "stderr_lines": len(lines),
                "traceback": any("Traceback" in line or "Segmentation" in line for line in lines),
                "workdir_changed": changed,
                "seconds": round(seconds, 2),
                "last_line": lines[-1][:300] if lines else "",
            }
            results.append(row)
            print(
                f"{row['case']:44} {row['expected']:>8} {row['exit']!s:>8} {row['stderr_lines']:>12} "
                f"{row['traceback']!s:>9} {row['workdir_changed']!s:>9} {row['seconds']:>6}",
                flush=True,
            )
        ok = sum(
            r["exit"] == r["expected"]
            and r["stderr_lines"] == (r["expected"] != 0)
            and not r["traceback"]
            and not r["workdir_changed"]
            for r in results
        )
        print(
            f"{ok}/{len(results)} cases end as wanted (expected exit code, one stderr line on error, no traceback, "
            "P unchanged)"
        )
        if args.out:
            Path(args.out).write_text(json.dumps({"repo": str(repo), "results": results}, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
