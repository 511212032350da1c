"""Step-time overhead of each training policy against the plain jitted train step (and TTA's eval cost).

Usage: python experiments/policy_overhead/run.py [--width 16] [--batch-size 128] [--steps 10]
Prints a table (median ms/step over --steps timed steps after one warm-up step) and one JSON line.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jaxcifar import Config, steps
from jaxcifar.mixing import MixSpec
from jaxcifar.optim import make_optimizer
from jaxcifar.state import create_train_state
from jaxcifar.trainer import build_model

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def time_calls(fn, state, batch, n, donate):
    """Median seconds per call of fn(state, batch) over n calls after one warm-up call."""
    out = fn(state, batch)
    state = out[0] if donate else state
    jax.block_until_ready(out)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        out = fn(state, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
        state = out[0] if donate else state
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (default 16)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    args = parser.parse_args()
    config = Config(width=args.width, batch_size=args.batch_size)
    key = jax.random.PRNGKey(0)
    batch = {
        "image": jax.random.randint(key, (args.batch_size, 32, 32, 3), 0, 256).astype(jnp.uint8),
        "label": jax.random.randint(key, (args.batch_size,), 0, 10),
        "mask": jnp.ones(args.batch_size, bool),
    }
    train_variants = {
        "plain": {},
        "ema 0.999": {"ema_decay": 0.999},
        "mixup 0.2": {"mix": MixSpec(mixup_alpha=0.2)},
        "cutmix 1.0": {"mix": MixSpec(cutmix_alpha=1.0)},
        "label smoothing 0.1": {"label_smoothing": 0.1},
    }
    results = {}
    for name, kwargs in train_variants.items():
        tx = make_optimizer(config, optax.constant_schedule(0.1))
        state = create_train_state(build_model(config), tx, 0, ema="ema_decay" in kwargs)
        fn = steps.make_train_step(MEAN, STD, "crop-flip", **kwargs)
        results[f"train: {name}"] = time_calls(fn, state, batch, args.steps, donate=True)
    tx = make_optimizer(config, optax.constant_schedule(0.1))
    state = create_train_state(build_model(config), tx, 0)
    for mode in ("none", "flip", "flip-translate"):
        fn = steps.make_eval_step(MEAN, STD, tta=mode)
        results[f"eval: tta {mode}"] = time_calls(fn, state, batch, args.steps, donate=False)
    print(f"ResNet18 width {args.width}, batch {args.batch_size}, {jax.devices()[0].platform}, median of {args.steps}")
    print("| step | ms/step | vs plain |")
    print("|---|---|---|")
    for name, seconds in results.items():
        base = results["train: plain"] if name.startswith("train") else results["eval: tta none"]
        print(f"| {name} | {1000 * seconds:.1f} | {100 * (seconds / base - 1):+.1f} % |")
    print(json.dumps({name: round(1000 * s, 2) for name, s in results.items()}))


if __name__ == "__main__":
    main()
