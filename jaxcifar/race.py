"""``python -m jaxcifar.race``: train a recipe with N seeds and report how fast it reaches a test accuracy.

Each run is ``jaxcifar.pipeline.run`` of the config with ``--seed`` = first seed + k, in its own workdir
(``--out-dir``/seed-S). Per run: the final test accuracy, the first epoch whose test accuracy reaches
``--target``, the training seconds up to the end of that epoch (the sum of the epochs' ``train_seconds``,
the time airbench counts; evaluation and checkpoints excluded), the wall seconds from the run's start to the
end of that epoch's evaluation (everything included: run 1 from the process's start, imports and all; later
runs from their own start), and the run's time breakdown (``timing.json``: start-up, data, compile, train,
eval, checkpoint, total). The first run of the process compiles (unless the persistent compilation cache
already holds the steps): it is the cold run; later runs load the compiled steps from that cache and find
the data decoded, so they are warm. Results go to ``--out-dir``/race.json with mean and standard deviation
(sample, n - 1) over the runs, and the wall time to the target of the cold run apart from the warm ones.
"""

from __future__ import annotations

import time

from jaxcifar import interrupts

STARTED = time.perf_counter()

if __name__ == "__main__":
    interrupts.install("python -m jaxcifar.race")

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxcifar import cli
from jaxcifar.config import Config
from jaxcifar.errors import ConfigError
from jaxcifar.files import write_json
from jaxcifar.pipeline import run


def run_record(history: list[dict[str, Any]], timing: dict[str, float], target: float) -> dict[str, Any]:
    """Returns one run's record: ``final_acc``, ``epoch_to_target``, ``train_seconds_to_target`` and
    ``wall_seconds_to_target`` (each None when the target was never reached), ``timing`` (the run's breakdown)."""
    reached = next((i for i, h in enumerate(history) if h["test_acc"] >= target), None)
    train_seconds = None if reached is None else sum(h["train_seconds"] for h in history[: reached + 1])
    return {
        "final_acc": history[-1]["test_acc"],
        "epoch_to_target": None if reached is None else history[reached]["epoch"],
        "train_seconds_to_target": None if train_seconds is None else round(train_seconds, 3),
        "wall_seconds_to_target": None if reached is None else history[reached]["wall_seconds"],
        "timing": timing,
    }


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Returns ``{"mean", "std", "n"}`` of the values that are not None (std: sample, n - 1; 0 for one value;
    mean and std None for none)."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(present) / len(present)
    var = sum((v - mean) ** 2 for v in present) / (len(present) - 1) if len(present) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": len(present)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns mean +- std over ``runs`` of the final accuracy, the training and wall seconds to the target (over
    the runs that reached it; the wall seconds of the first, cold run apart from the later, warm ones), and each
    timing phase."""
    phases = runs[0]["timing"].keys() if runs else []
    wall = [r["wall_seconds_to_target"] for r in runs]
    return {
        "final_acc": mean_std([r["final_acc"] for r in runs]),
        "train_seconds_to_target": mean_std([r["train_seconds_to_target"] for r in runs]),
        "wall_seconds_to_target": {"cold": mean_std(wall[:1]), "warm": mean_std(wall[1:])},
        "reached": sum(r["epoch_to_target"] is not None for r in runs),
        "timing": {p: mean_std([r["timing"][p] for r in runs]) for p in phases},
    }


def race(config: Config, target: float, runs: int, out_dir: str | Path, verbose: bool = True) -> dict[str, Any]:
    """Trains ``runs`` seeds of ``config`` (seeds ``config.seed`` ...) in ``out_dir``/seed-S and returns (and
    writes to ``out_dir``/race.json) ``{"config", "target", "runs": [...], "summary": ...}``."""
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"--target {target}: must be in (0, 1]")
    if runs < 1:
        raise ConfigError(f"--runs {runs}: must be >= 1")
    out = Path(out_dir)
    records = []
    for k in range(runs):
        seed = config.seed + k
        started = STARTED if k == 0 else time.perf_counter()
        result = run(config.replace(seed=seed, workdir=str(out / f"seed-{seed}")), verbose=verbose, started=started)
        records.append({"seed": seed, **run_record(result.history, result.timing or {}, target)})
    report = {"config": config.to_dict(), "target": target, "runs": records, "summary": summarize(records)}
    write_json(out / "race.json", report)
    return report


def build_parser() -> cli.ArgumentParser:
    """Returns the parser of ``python -m jaxcifar.race``: the training flags plus ``--target``, ``--runs``,
    ``--out-dir``."""
    parser = cli.ArgumentParser(
        prog="python -m jaxcifar.race",
        description="Train N seeds of a recipe and report final accuracy and time to a target test accuracy.",
    )
    parser.add_argument("--target", type=cli.finite_float, default=0.85, help="Target test accuracy (default 0.85).")
    parser.add_argument("--runs", type=int, default=3, help="Number of seeds (default 3).")
    parser.add_argument("--out-dir", default="runs/race", help="Folder of the runs and race.json (default runs/race).")
    cli.add_config_flags(parser, exclude=("workdir", "resume"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit code."""
    parser = build_parser()
    config = cli.parse_config(parser, argv)
    args = parser.parse_args(argv)
    cli.configure_logging()

    def body() -> int:
        report = race(config, args.target, args.runs, args.out_dir)
        s = report["summary"]
        acc, secs = s["final_acc"], s["train_seconds_to_target"]
        line = f"race: final acc {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f}% over {args.runs} runs"
        if secs["n"]:
            reached = f"{args.target:.0%} reached by {s['reached']}"
            line += f"; {reached}, in {secs['mean']:.1f} +- {secs['std']:.1f}s of training"
            cold, warm = s["wall_seconds_to_target"]["cold"], s["wall_seconds_to_target"]["warm"]
            if cold["n"]:
                line += f", {cold['mean']:.1f}s wall cold"
            if warm["n"]:
                line += f", {warm['mean']:.1f} +- {warm['std']:.1f}s wall warm"
        else:
            line += f"; {args.target:.0%} never reached"
        print(line + f"; {Path(args.out_dir) / 'race.json'}", flush=True)
        return 0

    return cli.run_command(parser.prog, body, lambda: f"runs so far in {args.out_dir}")


if __name__ == "__main__":
    interrupts.exit_with(main)
