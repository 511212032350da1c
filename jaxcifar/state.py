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
    ``ema_params``/``ema_batch_stats`` hold the exponential moving average of the weights when EMA
    is enabled (``--ema-decay``), else None.
    """

    batch_stats: Any
    rng: jax.Array
    ema_params: Any = None
    ema_batch_stats: Any = None

    def variables(self, ema: bool = False) -> dict[str, Any]:
        """Returns ``{"params", "batch_stats"}`` for ``apply``: the EMA weights when ``ema``."""
        if ema:
            if self.ema_params is None:
                raise ValueError("this state keeps no EMA weights (train with --ema-decay)")
            return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        return {"params": self.params, "batch_stats": self.batch_stats}

    def update_ema(self, decay: float) -> TrainState:
        """Returns the state with ``ema = decay * ema + (1 - decay) * current`` (params and batch stats)."""
        return self.replace(
            ema_params=optax.incremental_update(self.params, self.ema_params, 1.0 - decay),
            ema_batch_stats=optax.incremental_update(self.batch_stats, self.ema_batch_stats, 1.0 - decay),
        )


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...] = (32, 32, 3)) -> dict[str, Any]:
    """Returns ``{"params", "batch_stats"}`` of ``model`` for (1, *image_shape) inputs (no perturbations)."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.jit(lambda key: model.init(key, dummy, train=False, mutable=["params", "batch_stats"]))(rng)
    return dict(variables)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, ema: bool = False) -> TrainState:
    """Returns a fresh TrainState: params from ``seed``, optimizer state of ``tx``, step 0.

    With ``ema`` the EMA weights start as a copy of the initial weights.
    """
    root = jax.random.PRNGKey(seed)
    init_key, run_key = jax.random.split(root)
    variables = init_variables(model, init_key)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
        rng=run_key,
        ema_params=jax.tree.map(jnp.copy, variables["params"]) if ema else None,
        ema_batch_stats=jax.tree.map(jnp.copy, variables["batch_stats"]) if ema else None,
    )


def checkpoint_items(state: TrainState) -> dict[str, Any]:
    """Returns the state's leaves as a plain dict (what a checkpoint stores; EMA weights when kept)."""
    items = {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": state.rng,
    }
    if state.ema_params is not None:
        items["ema_params"] = state.ema_params
        items["ema_batch_stats"] = state.ema_batch_stats
    return items


def param_count(params: Any) -> int:
    """Returns the number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
