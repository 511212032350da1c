"""The training state pytree and its construction."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from flax.training.dynamic_scale import DynamicScale

# Compute dtypes whose gradients need loss scaling: float16's range ends at 65504 and its smallest normal
# number is 6.1e-5, so unscaled gradients underflow to zero and scaled ones can overflow.
SCALED_DTYPES = (jnp.dtype(jnp.float16),)


class TrainState(train_state.TrainState):
    """``step``, ``params``, ``opt_state`` (from Flax) plus BatchNorm ``batch_stats`` and the run's ``rng``.

    ``apply_fn`` and ``tx`` are static (not leaves). ``rng`` is a raw uint32 (2,) key; per-step
    randomness is ``fold_in(rng, step)``, so a resumed run draws exactly what the original would.
    ``ema_params``/``ema_batch_stats`` hold the exponential moving average of the weights when EMA
    is enabled (``--ema-decay``), else None. ``dynamic_scale`` is flax's ``DynamicScale`` (the loss scale
    and its count of finite steps, float32/int32 scalars) of a float16 run (``--dtype float16``), else None.
    ``lookahead`` holds the slow ``{"params", "batch_stats"}`` of Lookahead (``--lookahead-every``), else None.
    """

    batch_stats: Any
    rng: jax.Array
    ema_params: Any = None
    ema_batch_stats: Any = None
    dynamic_scale: DynamicScale | None = None
    lookahead: Any = None

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


def default_dynamic_scale(dtype: Any) -> DynamicScale | None:
    """Returns a fresh ``DynamicScale`` when the compute ``dtype`` needs loss scaling (float16), else None.

    Flax's (and PyTorch GradScaler's) defaults: scale 2**16, halved after a non-finite gradient, doubled
    after 2000 finite steps in a row. The scale (float32) and the count (int32) are arrays, so that the
    jitted step's output state has the structure and dtypes of its input (one compile) and checkpoints
    store them as they store the other leaves.
    """
    if dtype is None or jnp.dtype(dtype) not in SCALED_DTYPES:
        return None
    return DynamicScale(fin_steps=jnp.zeros((), jnp.int32), scale=jnp.asarray(2.0**16, jnp.float32))


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seed: int,
    ema: bool = False,
    dynamic_scale: DynamicScale | Literal["auto"] | None = "auto",
    lookahead: bool = False,
    init_params: Callable[[Any], Any] | None = None,
) -> TrainState:
    """Returns a fresh TrainState: params from ``seed``, optimizer state of ``tx``, step 0.

    With ``ema`` the EMA weights start as a copy of the initial weights. ``dynamic_scale`` is the
    state's loss scale: ``"auto"`` gives ``default_dynamic_scale(model.dtype)`` (a scale for a float16
    model, None otherwise), None gives none, and a ``DynamicScale`` is used as given (its ``scale`` and
    ``fin_steps`` should be arrays; see ``default_dynamic_scale``). With ``lookahead`` the slow weights of
    Lookahead start as a copy of the initial weights. ``init_params`` maps the random initial params to the
    ones training starts from (e.g. ``jaxcifar.models.initial_params`` on the training images) before the
    optimizer state and the copies are made.
    """
    if isinstance(dynamic_scale, str):
        if dynamic_scale != "auto":
            raise ValueError(f"dynamic_scale must be 'auto', None or a DynamicScale, got {dynamic_scale!r}")
        dynamic_scale = default_dynamic_scale(getattr(model, "dtype", None))
    root = jax.random.PRNGKey(seed)
    init_key, run_key = jax.random.split(root)
    variables = init_variables(model, init_key)
    if init_params is not None:
        variables["params"] = init_params(variables["params"])
    copy = functools.partial(jax.tree.map, jnp.copy)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
        rng=run_key,
        ema_params=jax.tree.map(jnp.copy, variables["params"]) if ema else None,
        ema_batch_stats=jax.tree.map(jnp.copy, variables["batch_stats"]) if ema else None,
        dynamic_scale=dynamic_scale,
        lookahead=copy({"params": variables["params"], "batch_stats": variables["batch_stats"]}) if lookahead else None,
    )


def checkpoint_items(state: TrainState) -> dict[str, Any]:
    """Returns the state's leaves as a plain dict (what a checkpoint stores; EMA weights when kept, the loss
    scale under ``dynamic_scale`` when the state has one: float32 and bfloat16 checkpoints are unchanged)."""
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
    if state.dynamic_scale is not None:
        items["dynamic_scale"] = state.dynamic_scale
    if state.lookahead is not None:
        items["lookahead"] = state.lookahead
    return items


def param_count(params: Any) -> int:
    """Returns the number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
