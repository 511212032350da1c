"""airbench94's tiny preset run (tests/test_presets.py's sizes: synthetic data, width 4, 256 images, batch 32)
under the test suite's ``jax_disable_most_optimizations``, with the models' max-pool either as committed
(``conv.max_pool``: arg-max residual, one-element gradient) or replaced by a plain max over a reshape whose
gradient is ``jnp.max``'s (``g * (x == max) / count(x == max)``). Prints each epoch's train loss and test
accuracy, or the DivergedError. With ``--hlo FILE`` it writes the optimized HLO of one such train step
(width 4, batch 32) instead, to read where the comparison ``x == max`` is computed.

    python experiments/cpu_speed_airbench/nan_repro.py --pool jnp-max      # nan in epoch 1
    python experiments/cpu_speed_airbench/nan_repro.py --pool committed    # learns
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxcifar.models import airbench


def reshape_max_pool(x: jax.Array, size: int) -> jax.Array:
    b, h, w, c = x.shape
    x = x[:, : h // size * size, : w // size * size, :].reshape(b, h // size, size, w // size, size, c)
    return jnp.max(x, axis=(2, 4))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pool", choices=("committed", "jnp-max"), default="jnp-max")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--optimize", action="store_true", help="leave XLA's optimizations on")
    p.add_argument("--hlo", default="", help="write one train step's optimized HLO here and stop")
    args = p.parse_args()
    jax.config.update("jax_disable_most_optimizations", not args.optimize)
    if args.pool == "jnp-max":
        airbench.max_pool = reshape_max_pool
    from jaxcifar import Config, fit
    from jaxcifar.errors import DivergedError

    preset = Config.load(Path(__file__).resolve().parents[1] / "airbench94" / "config.json")
    workdir = tempfile.mkdtemp()
    config = preset.replace(
        data_source="synthetic",
        width=4,
        train_subset=256,
        test_subset=128,
        batch_size=32,
        eval_batch_size=128,
        epochs=args.epochs,
        compile_cache=False,
        async_checkpoints=False,
        lr=preset.lr * 32 / preset.batch_size,
        whiten_bias_epochs=1,
        workdir=workdir,
    )
    if args.hlo:
        import optax

        from jaxcifar import backend, models, optim, steps
        from jaxcifar.data import NORMALIZATION
        from jaxcifar.measure import random_batch
        from jaxcifar.state import create_train_state

        model = models.get_model("airbench", num_classes=10, width=4)
        state = create_train_state(model, optim.make_optimizer(config, optax.constant_schedule(0.01)), seed=0)
        images, labels = random_batch(32)
        step = steps.make_train_step(*NORMALIZATION["cifar10"], "crop-flip", xla_options=backend.compiler_options())
        Path(args.hlo).write_text(step.lower(state, {"image": images, "label": labels}).compile().as_text())
        return
    try:
        _, history = fit(config, verbose=False)
        print(f"pool={args.pool}:", [(round(h["train_loss"], 4), h["test_acc"]) for h in history])
    except DivergedError as e:
        print(f"pool={args.pool}: {e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
