"""The training state pytree and its construction."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """``step``, ``params``, ``opt_state`` (from Flax) plus BatchNorm ``batch_stats`` and the run's ``rng``.

    ``apply_fn`` and ``tx`` are static (not leaves). ``rng`` is a raw uint32 (2,) key; per-step
    randomness is ``fold_in(rng, step)``, so a resumed run draws exactly what the original would.
    """

    batch_stats: Any
    rng: jax.Array


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...] = (32, 32, 3)) -> dict[str, Any]:
    """Returns ``{"params", "batch_stats"}`` of ``model`` for (1, *image_shape) inputs (no perturbations)."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.jit(lambda key: model.init(key, dummy, train=False, mutable=["params", "batch_stats"]))(rng)
    return dict(variables)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Returns a fresh TrainState: params from ``seed``, optimizer state of ``tx``, step 0."""
    root = jax.random.PRNGKey(seed)
    init_key, run_key = jax.random.split(root)
    variables = init_variables(model, init_key)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
        rng=run_key,
    )


def checkpoint_items(state: TrainState) -> dict[str, Any]:
    """Returns the state's leaves as a plain dict (what a checkpoint stores)."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": state.rng,
    }


def param_count(params: Any) -> int:
    """Returns the number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
