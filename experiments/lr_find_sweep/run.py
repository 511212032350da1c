"""Does the LR range test's suggestion land where onecycle training works? A short peak-LR sweep beside it.

Usage: python experiments/lr_find_sweep/run.py --data-dir DIR [--width 16] [--train-subset 5000]
    [--test-subset 5000] [--epochs 3] [--batch-size 128] [--lrs 0.02 0.05 0.1 0.2 0.4 0.8] [--seed 0]
    [--out results.json]

Trains the default recipe (SGD with Nesterov momentum 0.9, weight decay 5e-4, onecycle, crop + flip) once
per peak LR, all with the same seed and data, then runs ``jaxcifar.lr_find`` on the same configuration.
Prints one JSON line per LR, one JSON line for the range test (its suggestion and every rule), and a
table; ``--out`` also writes everything as one JSON file (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxcifar import Config, fit, load_dataset
from jaxcifar.lr_find import lr_find


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 image folder (train/CLASS/*.jpg, test/...)")
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (default 16)")
    parser.add_argument("--train-subset", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--test-subset", type=int, default=5000, help="test images (default 5000)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per sweep run (default 3)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.4, 0.8], help="onecycle peak LRs to train"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every run and of the range test (default 0)")
    parser.add_argument("--skip-sweep", action="store_true", help="only run the range test")
    parser.add_argument("--out", type=Path, default=None, help="also write all results to this JSON file")
    return parser.parse_args(argv)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Writes ``payload`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    config = Config(
        model="resnet18",
        width=args.width,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    dataset = load_dataset(config)
    setup = {
        "width": args.width,
        "train_subset": args.train_subset,
        "test_subset": args.test_subset,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "recipe": f"{config.optimizer} momentum {config.momentum} nesterov {config.nesterov}, weight decay "
        f"{config.weight_decay}, {config.schedule} (pct_start {config.pct_start}, div {config.div_factor}), "
        f"{config.augment}",
        "steps_per_epoch": len(dataset.train.labels) // args.batch_size,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0].platform}",
    }
    print(json.dumps({"setup": setup}), flush=True)

    sweep = []
    for lr in [] if args.skip_sweep else args.lrs:
        with tempfile.TemporaryDirectory() as workdir:
            t0 = time.perf_counter()
            _, history = fit(config.replace(lr=lr, workdir=workdir), dataset, verbose=False)
            seconds = time.perf_counter() - t0
        last = history[-1]
        row = {
            "lr": lr,
            "test_acc": round(float(last["test_acc"]), 4),
            "test_loss": round(float(last["test_loss"]), 4),
            "train_loss": round(float(last["train_loss"]), 4),
            "train_acc": round(float(last["train_acc"]), 4),
            "test_acc_per_epoch": [round(float(h["test_acc"]), 4) for h in history],
            "seconds": round(seconds, 1),
        }
        sweep.append(row)
        print(json.dumps(row), flush=True)

    t0 = time.perf_counter()
    found = lr_find(config.replace(lr=0.1), dataset, verbose=False)
    finder = {
        "suggestion": found.suggestion,
        "rule": found.rule,
        "rules": found.rules,
        "steps": len(found.lrs),
        "stopped_early": found.stopped_early,
        "range": [config.lr_find_start, config.lr_find_end, config.lr_find_steps],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({"lr_find": finder}), flush=True)

    summary = {}
    if sweep:
        best = max(sweep, key=lambda r: r["test_acc"])
        factor = max(best["lr"] / found.suggestion, found.suggestion / best["lr"])
        summary = {"best_lr": best["lr"], "best_test_acc": best["test_acc"], "suggestion": found.suggestion}
        summary["factor"] = round(factor, 2)
        summary["rule_factors"] = {
            name: round(max(best["lr"] / v, v / best["lr"]), 2) for name, v in found.rules.items() if v > 0
        }
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({"summary": summary}), flush=True)

    print()
    print(f"{'peak LR':>8} | {'test acc':>8} | {'train loss':>10} | {'seconds':>7}")
    for row in sweep:
        mark = "  <- best" if summary.get("best_lr") == row["lr"] else ""
        acc, loss = 100 * row["test_acc"], row["train_loss"]
        print(f"{row['lr']:>8g} | {acc:>7.2f}% | {loss:>10.4f} | {row['seconds']:>7.1f}{mark}")
    print(f"lr_find suggestion: {found.suggestion:.3g} ({found.rule})")
    for name, value in found.rules.items():
        print(f"  {name:>14}: {value:.3g}")
    if sweep:
        print(f"best sweep LR {summary['best_lr']:g} / suggestion {found.suggestion:.3g}: factor {summary['factor']:g}")
    print(f"wall time {summary['wall_seconds']:.0f} s")

    if args.out is not None:
        payload = {"setup": setup, "sweep": sweep, "lr_find": finder, "summary": summary}
        payload["lr_find"]["lrs"] = np.asarray(found.lrs).tolist()
        payload["lr_find"]["losses"] = np.asarray(found.losses).tolist()
        payload["lr_find"]["smoothed"] = np.asarray(found.smoothed).tolist()
        write_json_atomic(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
