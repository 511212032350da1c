"""Summarizes cold-start race records (one ``race.json`` per seed, each a one-run race): final accuracy and the
wall and training seconds to 85 % and 90 % test accuracy, mean +- sample std over the runs, as JSON.

    python experiments/cpu_fast/summarize.py runs/cpu_fast/seed-*/race.json

Each seed's ``history.json`` is read from the race's run folder (``seed-S/seed-S/history.json``, as the race wrote
it) or, in the committed records, beside its ``race.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jaxcifar.race import mean_std


def to_target(history: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """Returns the first epoch whose test accuracy reached ``target``: its number, the training seconds up to its
    end (the epochs' ``train_seconds``) and the wall seconds from the process's start; None if none did."""
    train = 0.0
    for record in history:
        train += record["train_seconds"]
        if record["test_acc"] >= target:
            return {"epoch": record["epoch"], "train_seconds": train, "wall_seconds": record["wall_seconds"]}
    return None


def main(paths: list[str]) -> None:
    """Prints the per-run and summary JSON for the race records at ``paths``."""
    runs = []
    for path in paths:
        report = json.load(open(path))
        (run,) = report["runs"]
        folder = Path(path).parent
        nested = folder / f"seed-{run['seed']}" / "history.json"
        history = json.loads((nested if nested.is_file() else folder / "history.json").read_text())
        runs.append(
            {
                "seed": run["seed"],
                "final_acc": run["final_acc"],
                "total_wall_seconds": run["timing"].get("total"),
                **{f"to_{t}": to_target(history, t) for t in (0.85, 0.90)},
            }
        )
    summary = {"final_acc": mean_std([r["final_acc"] for r in runs])}
    for t in (0.85, 0.90):
        for kind in ("wall_seconds", "train_seconds"):
            summary[f"{kind}_to_{t}"] = mean_std([(r[f"to_{t}"] or {}).get(kind) for r in runs])
    print(json.dumps({"runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
