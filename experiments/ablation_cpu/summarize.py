"""Summarize the CPU ablation: mean and spread of the final test accuracy and wall time per variant.

Usage: python experiments/ablation_cpu/summarize.py RUNS_DIR  (writes results.json beside this file)
"""

import json
import sys
from pathlib import Path

import numpy as np

runs = Path(sys.argv[1])
rows = {}
for variant in ("baseline", "label_smoothing", "ema", "cutmix", "baseline_tta"):
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
out = Path(__file__).with_name("results.json")
out.write_text(json.dumps(rows, indent=2) + "\n")
print("| variant | test acc (seeds 0, 1, 2) | mean ± std | wall time per run |")
print("|---|---|---|---|")
for name, row in rows.items():
    wall = f"{np.mean(row['wall_s']):.0f} s" if row["wall_s"] else "(evaluation only)"
    print(f"| {name} | {', '.join(f'{a:.2f}' for a in row['test_acc'])} | {row['mean']:.2f} ± {row['std']} | {wall} |")
