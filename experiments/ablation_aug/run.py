"""The augmentation ablation at a CPU budget: what a policy, label smoothing, EMA and flip TTA each do, and together.

    python experiments/ablation_aug/run.py --data-dir /tmp/data/cifar10-jpeg [--runs-dir runs/ablation_aug]
        [--variants baseline trivialaugment ...] [--seeds 0 1 2]

Every run is ``jaxcifar.fit`` on ``config.json`` beside this file (ResNet18 width 16, 5,000 stratified training
and 5,000 stratified test images, 4 epochs, batch 128, SGD + Nesterov, OneCycle to 0.1) with the variant's
fields replaced, into ``RUNS_DIR/VARIANT/seedN`` (``resume=True``: an interrupted run continues, a finished one
is only read back; a run of the CLI with the same config and workdir counts as done). The dataset is loaded once
(its subsets drawn with seed 0), so every run sees the same images and the seeds vary the initialization, the
batch order and the augmentation draws. A run's accuracy is its last epoch's test accuracy (the final state; the
EMA weights' for EMA variants, the raw weights' beside it); its final state is evaluated again with
``jaxcifar.evaluate(..., tta="flip")`` (TTA costs no training: every run gives both numbers). Several copies may
run at once (e.g. one with ``--reverse``): a run whose workdir another copy holds is skipped by this one. Each
run's record goes to ``RUNS_DIR/VARIANT/seedN.json``; after every run ``results.json`` (all records; per variant
the mean and std over seeds and the difference to the baseline, of the means and paired by seed) and
``summary.md`` (the table) beside this file are rewritten from the records found.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jaxcifar
from jaxcifar.files import write_json

HERE = Path(__file__).resolve().parent
EMA_DECAY = 0.95  # a horizon of ~20 steps, 13 % of the 156-step run (see README)
# name -> the Config fields it replaces; the order is the order the runs are made in (most important first)
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "trivialaugment": {"policy": "trivialaugment"},
    "label_smoothing": {"label_smoothing": 0.1},
    "ema": {"ema_decay": EMA_DECAY},
    "combination": {"policy": "trivialaugment", "label_smoothing": 0.1, "ema_decay": EMA_DECAY},
    "randaugment": {"policy": "randaugment"},
    "autoaugment": {"policy": "autoaugment"},
}


def run_one(base: jaxcifar.Config, dataset: jaxcifar.Dataset, variant: str, seed: int, runs: Path) -> dict:
    """Trains (or reads back) one run and returns its record: final test accuracy (%) without and with flip TTA
    (EMA weights for EMA variants; ``raw_acc`` the raw weights'), the per-epoch test accuracies, the wall time."""
    config = base.replace(seed=seed, workdir=str(runs / variant / f"seed{seed}"), resume=True, **VARIANTS[variant])
    started = time.monotonic()
    state, history = jaxcifar.fit(config, dataset)
    fit_s = time.monotonic() - started
    ema = config.ema_decay is not None
    last = history[-1]
    record = {
        "variant": variant,
        "seed": seed,
        "changes": VARIANTS[variant],
        "acc": 100 * last["ema_test_acc" if ema else "test_acc"],
        "acc_tta_flip": 100 * jaxcifar.evaluate(state, dataset, tta="flip", ema=ema)["acc"],
        "epoch_test_acc": [round(100 * r.get("ema_test_acc", r["test_acc"]), 2) for r in history],
        "fit_wall_s": round(fit_s, 1),
        "train_s": round(sum(r["train_seconds"] for r in history), 1),
    }
    if ema:
        record["raw_acc"] = 100 * last["test_acc"]
    return record


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for one value), rounded to 2 decimals."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": round(statistics.mean(values), 2), "std": None if std is None else round(std, 2)}


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per row (a variant, and each variant's flip-TTA numbers as ``VARIANT+tta``): the seeds, accuracies, their
    mean and std, and the difference to the baseline without TTA (of the means; and paired by seed)."""
    by_variant: dict[str, dict[int, dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    base = {s: r["acc"] for s, r in by_variant.get("baseline", {}).items()}
    rows = {}
    for variant, runs in by_variant.items():
        for suffix, key in (("", "acc"), ("+tta", "acc_tta_flip")):
            accs = {s: runs[s][key] for s in sorted(runs)}
            row: dict[str, Any] = {"seeds": list(accs), "acc": [round(a, 2) for a in accs.values()]}
            row.update(mean_std(list(accs.values())))
            if suffix:  # what flip TTA adds to the same runs
                row["tta_gain"] = mean_std([runs[s]["acc_tta_flip"] - runs[s]["acc"] for s in accs])
            if base:
                row["diff_to_baseline"] = round(statistics.mean(accs.values()) - statistics.mean(base.values()), 2)
                paired = [accs[s] - base[s] for s in accs if s in base]
                if paired and not (variant == "baseline" and suffix == ""):
                    row["paired_diff"] = mean_std(paired)
            rows[variant + suffix] = row
    return rows


def signed(stats: dict | None) -> str:
    """``+m ± s`` of a ``mean_std`` result (empty for None)."""
    if stats is None:
        return ""
    return f"{stats['mean']:+.2f} ± " + ("n/a" if stats["std"] is None else f"{stats['std']:.2f}")


def table(rows: dict[str, dict]) -> str:
    """The markdown table of ``rows`` (``summarize``)."""
    lines = [
        "| variant | test acc per seed (%) | mean ± std (%) | diff to baseline (means) | paired diff ± std "
        "| TTA gain ± std |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        std = "n/a" if row["std"] is None else f"{row['std']:.2f}"
        diff = row.get("diff_to_baseline")
        lines.append(
            f"| {name} | {' / '.join(f'{a:.2f}' for a in row['acc'])} | {row['mean']:.2f} ± {std} | "
            f"{'' if diff is None else f'{diff:+.2f}'} | {signed(row.get('paired_diff'))} "
            f"| {signed(row.get('tta_gain'))} |"
        )
    return "\n".join(lines) + "\n"


def write_results(runs: Path, config_path: Path) -> None:
    """Rewrites ``results.json`` and ``summary.md`` beside this file from every record in ``runs``."""
    records = [json.loads(p.read_text()) for variant in VARIANTS for p in sorted((runs / variant).glob("seed*.json"))]
    rows = summarize(records)
    write_json(
        HERE / "results.json", {"config": config_path.name, "ema_decay": EMA_DECAY, "rows": rows, "runs": records}
    )
    (HERE / "summary.md").write_text(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the unpacked JPEG tree (train/ and test/ class folders)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/ablation_aug"), help="where the runs go")
    parser.add_argument("--config", type=Path, default=HERE / "config.json", help="the base configuration")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS)[:5], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--reverse", action="store_true", help="make the runs in the reverse order")
    parser.add_argument("--summary-only", action="store_true", help="only rewrite results.json and summary.md")
    args = parser.parse_args()
    if args.summary_only:
        write_results(args.runs_dir, args.config)
        print((HERE / "summary.md").read_text())
        return
    base = jaxcifar.Config.load(args.config).replace(data_dir=args.data_dir)
    dataset = jaxcifar.load_dataset(base)  # once, subsets drawn with the config's seed (0)
    order = [(v, s) for s in args.seeds for v in args.variants]  # seed-major: a cut sweep has every variant
    for variant, seed in reversed(order) if args.reverse else order:
        out = args.runs_dir / variant / f"seed{seed}.json"
        if out.exists():
            continue
        try:
            record = run_one(base, dataset, variant, seed, args.runs_dir)
        except jaxcifar.CheckpointError as e:  # another copy holds this workdir
            print(f"== {variant} seed {seed}: skipped ({e})", flush=True)
            continue
        write_json(out, record)
        write_results(args.runs_dir, args.config)
        print(f"== {variant} seed {seed}: {record['acc']:.2f} % (flip TTA {record['acc_tta_flip']:.2f} %)", flush=True)
    write_results(args.runs_dir, args.config)
    print((HERE / "summary.md").read_text())


if __name__ == "__main__":
    main()
