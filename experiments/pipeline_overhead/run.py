"""Input-pipeline overhead: an epoch's wall time against (steps x step time).

Trains with ``jaxcifar.fit`` exactly as the CLI does (device-resident data, on-device gather and
augmentation, progress bar, history, TensorBoard, checkpoints), then times the same train and eval
steps in isolation on one batch (``--steps`` calls back to back, median of 3 runs) and compares, for the
last epoch: the train loop (``train_seconds``) with steps x train step; the evaluation
(``eval_seconds``) with batches x eval step; the whole epoch (plus its checkpoint save and
summary line, measured as the time between the ends of consecutive epochs) with both.

Usage: python experiments/pipeline_overhead/run.py --data-dir DIR [--width 16] [--batch-size 128]
       [--train-subset 10240] [--test-subset 2000] [--epochs 2] [--steps 10]
``DIR`` holds CIFAR-10 as image folders (train/, test/; see README) or the python tarball
(``--data-source cifar-python``). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxcifar import Config, fit, optim, steps
from jaxcifar.data import load_dataset
from jaxcifar.state import create_train_state
from jaxcifar.trainer import build_model


def step_seconds(fn, state, batch, n: int, donate: bool, repeats: int = 3) -> float:
    """Seconds per call of ``fn(state, batch)``: ``n`` calls back to back (the state threaded
    through, waited for once at the end, as a train loop runs), the median of ``repeats`` such runs
    after one warm-up call."""
    out = fn(state, batch)
    jax.block_until_ready(out)
    state = out[0] if donate else state
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            out = fn(state, batch)
            state = out[0] if donate else state
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - start) / n)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 image folders or python tarball")
    parser.add_argument("--data-source", default="folder", help="folder or cifar-python (default folder)")
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (default 16)")
    parser.add_argument("--batch-size", type=int, default=128, help="train batch size (default 128)")
    parser.add_argument("--eval-batch-size", type=int, default=500, help="eval batch size (default 500)")
    parser.add_argument("--train-subset", type=int, default=10240, help="train images (default 10240)")
    parser.add_argument("--test-subset", type=int, default=2000, help="test images (default 2000)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs; the last one is measured (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="isolated steps per timing run (default 10)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="jaxcifar-pipeline-"))
    config = Config(
        width=args.width,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        epochs=args.epochs,
        lr=0.1,
        data_source=args.data_source,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        workdir=str(workdir),
    )
    start = time.perf_counter()
    dataset = load_dataset(config)
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    history = fit(config, dataset).history
    fit_seconds = time.perf_counter() - start
    last = history[-1]
    steps_per_epoch = len(dataset.train.labels) // config.batch_size
    eval_batches = -(-len(dataset.test.labels) // config.eval_batch_size)

    tx, _ = optim.make_training_optimizer(config, steps_per_epoch)
    state = create_train_state(build_model(config), tx, config.seed)
    images, labels = dataset.train.images[: config.batch_size], dataset.train.labels[: config.batch_size]
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    train_step = steps.make_train_step(dataset.mean, dataset.std, config.augment, config.cutout_size)
    train_s = step_seconds(train_step, state, batch, args.steps, donate=True)
    n_eval = config.eval_batch_size
    eval_images = np.resize(dataset.test.images, (n_eval, *dataset.test.images.shape[1:]))
    eval_batch = {
        "image": jax.device_put(eval_images),
        "label": jax.device_put(np.resize(dataset.test.labels, n_eval)),
        "mask": jax.device_put(np.ones(n_eval, bool)),
    }
    state = create_train_state(build_model(config), tx, config.seed)
    eval_s = step_seconds(steps.make_eval_step(dataset.mean, dataset.std), state, eval_batch, args.steps, False)

    expected_train = steps_per_epoch * train_s
    expected_eval = eval_batches * eval_s
    rows = {
        "train loop": (last["train_seconds"], expected_train),
        "evaluation": (last["eval_seconds"], expected_eval),
        "epoch (train + eval)": (last["seconds"], expected_train + expected_eval),
    }
    print(
        f"ResNet18 width {config.width}, batch {config.batch_size}, {steps_per_epoch} steps/epoch, "
        f"eval {eval_batches} x {config.eval_batch_size}, {jax.devices()[0].platform}, epoch {last['epoch']} of "
        f"{config.epochs}; isolated: train step {1000 * train_s:.1f} ms, eval step {1000 * eval_s:.1f} ms "
        f"({args.steps} back to back, median of 3)"
    )
    outside = fit_seconds - sum(record["seconds"] for record in history)
    print(
        f"data loading (decode, once): {load_seconds:.1f} s; fit(): {fit_seconds:.1f} s, of which {outside:.1f} s "
        "outside the epochs (init, compile, checkpoint saves)"
    )
    print("| part | measured s | steps x step time s | overhead |")
    print("|---|---|---|---|")
    for name, (measured, expected) in rows.items():
        print(f"| {name} | {measured:.2f} | {expected:.2f} | {100 * (measured / expected - 1):+.1f} % |")
    summary = {
        name.split(" ")[0]: {"measured_s": round(m, 3), "expected_s": round(e, 3), "overhead": round(m / e - 1, 4)}
        for name, (m, e) in rows.items()
    }
    summary |= {"train_step_ms": round(1000 * train_s, 2), "eval_step_ms": round(1000 * eval_s, 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
