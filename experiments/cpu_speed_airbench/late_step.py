"""The airbench train step with and without the whitening layer's backward (run 9).

A run trains airbench's whitening bias for ``--whiten-bias-epochs`` only; after them it steps with
``setup.late_train_step`` (``steps.make_train_step(..., constant_params=optim.late_frozen_params("airbench"))``),
whose forward takes the whitening parameters as constants, so XLA drops the first convolution's input gradient
and the whitening layer's backward. This times both compiled steps (the bench's configuration: width 64, crop +
flip, SGD Nesterov, random uint8 images), alternating, and prints the convolutions in each compiled step and the
median ms per step. With ``--config`` it times a preset's own two steps instead (``setup.RunSetup.create``: its
optimizer, e.g. Muon, its batch size and augmentation) on ``--train-subset`` images of ``--data-dir``.

    python experiments/cpu_speed_airbench/late_step.py --batch-size 512 --rounds 8    # output: late_step.txt
    python experiments/cpu_speed_airbench/late_step.py --config experiments/airbench94_muon/config.json \
        --data-dir /tmp/data/cifar10-jpeg --rounds 6                                  # output: late_step_muon.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
import optax

from jaxcifar import bench, network, optim, steps
from jaxcifar.config import Config
from jaxcifar.data import NORMALIZATION
from jaxcifar.setup import RunSetup
from jaxcifar.state import create_train_state


def preset_steps(path: str, data_dir: str, train_subset: int) -> tuple[str, dict, dict, object]:
    """Returns (title, compiled steps, states, batch) of the preset at ``path``: ``RunSetup.train_step`` and
    ``late_train_step`` compiled for its initial state on the first batch of ``train_subset`` images."""
    config = Config.load(path).replace(data_dir=data_dir, train_subset=train_subset, test_subset=1000)
    setup = RunSetup.create(config)
    tx, _ = setup.training_optimizer()
    batch = setup.batch(setup.epoch_rows(1), 0)
    variants = {"full step": setup.train_step, "late step (whitening constant)": setup.late_train_step}
    compiled = {name: step.lower(setup.initial_state(tx), batch).compile() for name, step in variants.items()}
    states = {name: setup.initial_state(tx) for name in variants}
    title = f"{path}: {config.model} width {config.width}, batch {config.batch_size}, {config.optimizer}"
    return title, compiled, states, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="alternating timed steps of each (the first is dropped)")
    parser.add_argument(
        "--blocks", type=int, default=0, help="time in blocks of this many steps of each instead of alternating"
    )
    parser.add_argument("--config", help="a preset's config.json: time its own two steps (needs --data-dir)")
    parser.add_argument("--data-dir", help="the CIFAR-10 folder for --config")
    parser.add_argument("--train-subset", type=int, default=4000, help="training images loaded for --config")
    args = parser.parse_args()
    if args.config:
        title, compiled, states, batch = preset_steps(args.config, args.data_dir, args.train_subset)
    else:
        title, compiled, states, batch = bench_steps(args.width, args.batch_size)
    time_steps(title, compiled, states, batch, args.rounds, args.blocks)


def bench_steps(width: int, batch_size: int) -> tuple[str, dict, dict, object]:
    """Returns (title, compiled steps, states, batch) of the bench's configuration: SGD, crop + flip, random
    uint8 images."""
    config = bench.BenchSpec(model="airbench", width=width, batch_size=batch_size).config()
    model = network.build_model(config, jax.devices()[:1])
    tx = optim.make_optimizer(config, optax.constant_schedule(0.01))
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)),
        "label": jax.device_put(rng.integers(0, 10, batch_size).astype(np.int32)),
    }
    mean, std = NORMALIZATION["cifar10"]
    variants = {"full step": (), "late step (whitening constant)": optim.late_frozen_params("airbench")}
    compiled, states = {}, {}
    for name, constant in variants.items():
        state = create_train_state(model, tx, seed=0)
        step = steps.make_train_step(mean, std, config.augment, config.cutout_size, constant_params=constant)
        compiled[name] = step.lower(state, batch).compile()
        states[name] = state
    return f"airbench width {width}, batch {batch_size}, sgd (the bench's)", compiled, states, batch


def time_steps(title: str, compiled: dict, states: dict, batch: object, rounds: int, blocks: int = 0) -> None:
    """Times the compiled steps for ``rounds`` rounds, alternating step by step (``blocks`` 0) or ``blocks`` steps
    of one, then of the other; prints each one's convolutions and median ms (the first step of each block
    dropped)."""
    times: dict[str, list[float]] = {name: [] for name in compiled}
    dropped: dict[str, set[int]] = {name: set() for name in compiled}
    for _ in range(rounds):
        for name, step in compiled.items():
            dropped[name].add(len(times[name]))
            for _ in range(max(blocks, 1)):
                start = time.perf_counter()
                states[name], metrics = step(states[name], batch)
                jax.block_until_ready((states[name], metrics))
                times[name].append(time.perf_counter() - start)
    how = f"blocks of {blocks} steps, first of each block dropped" if blocks else "alternating, first dropped"
    print(f"{title}, {rounds} rounds ({how}), load average after: {os.getloadavg()[0]:.2f}")
    kept = {
        name: [t for i, t in enumerate(ts) if not (i in dropped[name] if blocks else i == 0)]
        for name, ts in times.items()
    }
    base = statistics.median(kept["full step"])
    for name, ts in times.items():
        ms = 1e3 * statistics.median(kept[name])
        convolutions = compiled[name].as_text().count(" convolution(")
        ratio = ms / (1e3 * base)
        each = " ".join(f"{1e3 * t:.0f}" for t in ts)
        print(
            f"{name:32s} {convolutions:3d} convolutions  median {ms:7.1f} ms ({ratio:.3f}x the full step)  all: {each}"
        )


if __name__ == "__main__":
    main()
