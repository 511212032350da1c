"""The airbench train step with and without the whitening layer's backward (run 9).

A run trains airbench's whitening bias for ``--whiten-bias-epochs`` only; after them it steps with
``setup.late_train_step`` (``steps.make_train_step(..., constant_params=optim.late_frozen_params("airbench"))``),
whose forward takes the whitening parameters as constants, so XLA drops the first convolution's input gradient
and the whitening layer's backward. This times both compiled steps (the bench's configuration: width 64, crop +
flip, SGD Nesterov, random uint8 images), alternating, and prints the convolutions in each compiled step and the
median ms per step.

    python experiments/cpu_speed_airbench/late_step.py --batch-size 512 --rounds 8    # output: late_step.txt
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
from jaxcifar.data import NORMALIZATION
from jaxcifar.state import create_train_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="alternating timed steps of each (the first is dropped)")
    args = parser.parse_args()
    config = bench.BenchSpec(model="airbench", width=args.width, batch_size=args.batch_size).config()
    model = network.build_model(config, jax.devices()[:1])
    tx = optim.make_optimizer(config, optax.constant_schedule(0.01))
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8)),
        "label": jax.device_put(rng.integers(0, 10, args.batch_size).astype(np.int32)),
    }
    mean, std = NORMALIZATION["cifar10"]
    variants = {"full step": (), "late step (whitening constant)": optim.late_frozen_params("airbench")}
    compiled, states = {}, {}
    for name, constant in variants.items():
        state = create_train_state(model, tx, seed=0)
        step = steps.make_train_step(mean, std, config.augment, config.cutout_size, constant_params=constant)
        compiled[name] = step.lower(state, batch).compile()
        states[name] = state
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in compiled.items():
            start = time.perf_counter()
            states[name], metrics = step(states[name], batch)
            jax.block_until_ready((states[name], metrics))
            times[name].append(time.perf_counter() - start)
    print(
        f"airbench width {args.width}, batch {args.batch_size}, {args.rounds} alternating rounds (first dropped), "
        f"load average after: {os.getloadavg()[0]:.2f}"
    )
    base = statistics.median(times["full step"][1:])
    for name, ts in times.items():
        ms = 1e3 * statistics.median(ts[1:])
        convolutions = compiled[name].as_text().count(" convolution(")
        ratio = ms / (1e3 * base)
        each = " ".join(f"{1e3 * t:.0f}" for t in ts)
        print(
            f"{name:32s} {convolutions:3d} convolutions  median {ms:7.1f} ms ({ratio:.3f}x the full step)  all: {each}"
        )


if __name__ == "__main__":
    main()
