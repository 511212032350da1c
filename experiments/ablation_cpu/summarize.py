"""Summarize the CPU ablation: mean and spread of the final test accuracy and wall time per variant.

Usage: python experiments/ablation_cpu/summarize.py RUNS_DIR [--out FILE]  (default: results.json beside this file)

Refuses (exit 1, one line, nothing written) when RUNS_DIR holds no finished run of some variant, so the
committed results are never overwritten with nothing; writes through a temporary file and os.replace.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = ("baseline", "label_smoothing", "ema", "cutmix", "baseline_tta")


def collect(runs: Path) -> dict:
    """Per variant: the final test accuracies (%), their mean and std, and the wall times of RUNS_DIR's runs."""
    rows = {}
    for variant in VARIANTS:
        accs, times = [], []
        for seed_dir in sorted(p for p in (runs / variant).glob("seed*") if p.is_dir()):
            if variant == "baseline_tta":
                accs.append(json.loads((seed_dir / "report.json").read_text())["accuracy"])
                continue
            last = json.loads((seed_dir / "history.json").read_text())[-1]
            accs.append(last["ema_test_acc"] if "ema_test_acc" in last else last["test_acc"])
            times.append(float(Path(f"{seed_dir}.time").read_text().strip()))
        if accs:
            rows[variant] = {
                "test_acc": [round(100 * a, 2) for a in accs],
                "mean": round(100 * float(np.mean(accs)), 2),
                "std": round(100 * float(np.std(accs, ddof=1)), 2) if len(accs) > 1 else None,
                "wall_s": [round(t) for t in times],
            }
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("runs", type=Path, help="the RUNS_DIR of run.sh (RUNS_DIR/VARIANT/seedN/...)")
parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"), help="results file")
args = parser.parse_args()
prog = "summarize.py"
if not args.runs.is_dir():
    sys.exit(f"{prog}: error: {args.runs} is not a directory; nothing written to {args.out}")
try:
    rows = collect(args.runs)
except (OSError, ValueError, KeyError, IndexError) as e:
    sys.exit(f"{prog}: error: unreadable or unfinished run in {args.runs} ({e}); nothing written to {args.out}")
missing = [v for v in VARIANTS if v not in rows]
if missing:
    sys.exit(f"{prog}: error: no finished run of {', '.join(missing)} in {args.runs}; nothing written to {args.out}")
write_atomic(args.out, json.dumps(rows, indent=2) + "\n")
print("| variant | test acc (seeds 0, 1, 2) | mean ± std | wall time per run |")
print("|---|---|---|---|")
for name, row in rows.items():
    wall = f"{np.mean(row['wall_s']):.0f} s" if row["wall_s"] else "(evaluation only)"
    print(f"| {name} | {', '.join(f'{a:.2f}' for a in row['test_acc'])} | {row['mean']:.2f} ± {row['std']} | {wall} |")
