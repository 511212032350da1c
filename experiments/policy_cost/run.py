"""Cost of the auto-augment policies: the augmentation alone and the whole ResNet18 train step.

Usage: python experiments/policy_cost/run.py [--width 64] [--batch-size 512] [--steps 5] [--skip-step] [--skip-augment]
Prints one JSON line per measurement (median ms over --steps timed calls after one warm-up call) and a
table. ``augment``: the jitted ``augmentation.augment_batch`` alone (uint8 batch in, uint8 out);
``train_step``: ``steps.make_train_step`` (augmentation + normalize + forward + backward + SGD) of ResNet18
at --width, crop+flip against crop+flip+TrivialAugmentWide, called alternately. Timings on a shared CPU
include other processes' load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
import optax

from jaxcifar import Config, backend, steps
from jaxcifar.augmentation import AugmentSpec, augment_batch
from jaxcifar.network import build_model
from jaxcifar.optim import make_optimizer
from jaxcifar.state import create_train_state

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
POLICIES = ("none", "trivialaugment", "autoaugment", "randaugment")


def median_ms(call, n: int) -> tuple[float, float]:
    """(median, min) milliseconds of ``call()`` over ``n`` calls after one warm-up call."""
    jax.block_until_ready(call())
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-step", action="store_true", help="time the augmentation alone")
    parser.add_argument("--skip-augment", action="store_true", help="time the train steps alone")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, 10, args.batch_size).astype(np.int32))
    rows = []
    for policy in () if args.skip_augment else POLICIES:
        spec = AugmentSpec.from_config(Config(policy=policy))
        augment = jax.jit(augment_batch, static_argnums=(2, 3))
        t0 = time.perf_counter()
        jax.block_until_ready(augment(jax.random.PRNGKey(0), images, spec, MEAN))
        compile_s = time.perf_counter() - t0
        keys = iter(jax.random.split(jax.random.PRNGKey(1), args.steps + 1))
        med, low = median_ms(lambda s=spec, f=augment, k=keys: f(next(k), images, s, MEAN), args.steps)
        rows.append(
            {
                "what": "augment",
                "policy": policy,
                "batch": args.batch_size,
                "median_ms": round(med, 1),
                "min_ms": round(low, 1),
                "first_call_s": round(compile_s, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_step:
        # both steps compiled first, then called alternately, so that load from other processes hits both alike
        config = Config(width=args.width, batch_size=args.batch_size)
        model = build_model(config, jax.devices()[:1])
        batch = {"image": images, "label": labels}
        compiled, holders, times = {}, {}, {}
        for policy in ("none", "trivialaugment"):
            spec = AugmentSpec.from_config(config.replace(policy=policy))
            state = create_train_state(model, make_optimizer(config, optax.constant_schedule(0.01)), 0)
            t0 = time.perf_counter()
            step = steps.make_train_step(MEAN, STD, spec, xla_options=backend.compiler_options())
            compiled[policy] = (step.lower(state, batch).compile(), time.perf_counter() - t0)
            holders[policy], times[policy] = {"state": state}, []
        for i in range(args.steps + 1):  # the first call of each is a warm-up
            for policy, (step, _) in compiled.items():
                start = time.perf_counter()
                holders[policy]["state"], metrics = step(holders[policy]["state"], batch)
                jax.block_until_ready(metrics)
                if i:
                    times[policy].append(1000 * (time.perf_counter() - start))
        for policy, (_, compile_s) in compiled.items():
            rows.append(
                {
                    "what": "train_step",
                    "policy": policy,
                    "model": f"resnet18 width {args.width}",
                    "batch": args.batch_size,
                    "median_ms": round(statistics.median(times[policy]), 1),
                    "min_ms": round(min(times[policy]), 1),
                    "ms": [round(t) for t in times[policy]],
                    "compile_s": round(compile_s, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"{'what':12s} {'policy':16s} {'median ms':>10s} {'min ms':>8s}")
    for r in rows:
        print(f"{r['what']:12s} {r['policy']:16s} {r['median_ms']:10.1f} {r['min_ms']:8.1f}")


if __name__ == "__main__":
    main()
