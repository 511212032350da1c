"""The assignment run's results, computed from the raw GPU files in ``h200/`` (nothing typed in by hand).

    python experiments/resnet18_onecycle_20ep/summarize.py   # prints the table, writes results.json beside it

Reads the jaxcifar histories (final test accuracy, the epochs' ``seconds``), the PyTorch reference runs
(final test accuracy, ``train_s`` per epoch) and the step benchmarks of both; see h200/README.md for how
each file was made (one NVIDIA H200, Python 3.12, jax 0.11.2, torch 2.11.0+cu130, the shared JPEG CIFAR-10).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAW = HERE / "h200"


def jaxcifar_run(name: str) -> dict[str, float]:
    history = json.loads((RAW / name).read_text())
    return {
        "epochs": len(history),
        "test_acc": round(100 * history[-1]["test_acc"], 2),
        "epoch_seconds": round(sum(r["seconds"] for r in history), 1),
    }


def torch_run(name: str) -> dict[str, float]:
    run = json.loads((RAW / name).read_text())
    return {
        "epochs": len(run["history"]),
        "test_acc": round(100 * run["final_test_acc"], 2),
        "train_seconds": round(sum(r["train_s"] for r in run["history"]), 1),
    }


def main() -> None:
    fp32 = {s: jaxcifar_run(f"jaxcifar_fp32_s{s}_history.json") for s in range(4)}
    accs = [r["test_acc"] for r in fp32.values()]
    bench = {d: json.loads((RAW / f"jaxcifar_bench_{d}.json").read_text()) for d in ("float32", "bfloat16")}
    torch_bench = [json.loads(line) for line in (RAW / "pytorch_bench.jsonl").read_text().splitlines() if line]
    results = {
        "device": "one NVIDIA H200",
        "versions": "Python 3.12, jax 0.11.2, flax 0.12.10, torch 2.11.0+cu130 (h200/README.md)",
        "data": "the shared JPEG copy of CIFAR-10 (quality 75), 50,000 train / 10,000 test images",
        "jaxcifar_float32": fp32,
        "jaxcifar_float32_mean_test_acc": round(statistics.mean(accs), 3),
        "jaxcifar_float32_std_test_acc": round(statistics.stdev(accs), 2),
        "jaxcifar_bfloat16": {0: jaxcifar_run("jaxcifar_bf16_s0_history.json")},
        "pytorch_same_recipe": {s: torch_run(f"pytorch_train_s{s}.json") for s in range(2)},
        "train_images_per_s": {
            "jaxcifar": {d: round(b["train"]["images_per_s"]) for d, b in bench.items()},
            "pytorch": [
                {"mode": b["mode"], "images_per_s": round(b["train_img_s"]), "note": b.get("note", "")}
                for b in torch_bench
            ],
        },
        "eval_images_per_s": {
            "jaxcifar": {d: round(b["eval"]["images_per_s"]) for d, b in bench.items()},
            "pytorch": [{"mode": b["mode"], "images_per_s": round(b["eval_img_s"])} for b in torch_bench],
        },
    }
    for seed, run in fp32.items():
        print(f"jaxcifar float32 seed {seed}: {run['test_acc']:.2f} %, epochs {run['epoch_seconds']} s")
    print(f"  mean {results['jaxcifar_float32_mean_test_acc']} %, std {results['jaxcifar_float32_std_test_acc']}")
    bf16 = results["jaxcifar_bfloat16"][0]
    print(f"jaxcifar bfloat16 seed 0: {bf16['test_acc']:.2f} %, epochs {bf16['epoch_seconds']} s")
    for seed, run in results["pytorch_same_recipe"].items():
        print(f"PyTorch seed {seed}: {run['test_acc']:.2f} %, train loop {run['train_seconds']} s")
    print("train images/s:", json.dumps(results["train_images_per_s"]))
    print("eval images/s:", json.dumps(results["eval_images_per_s"]))
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
