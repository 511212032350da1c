"""Jitted train and eval steps over device-resident uint8 batches.

``make_train_step`` / ``make_eval_step`` close over the static parts of the config and return
``jax.jit``-ed functions. The train step donates the state (updated in place on the device).
Metrics are sums over the batch (``loss_sum``, ``correct``, ``count``) so that epochs and padded
batches add up exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxcifar import backend, parallel, transforms
from jaxcifar.batches import Batch
from jaxcifar.mixing import NO_MIX, MixSpec, mix_batch, mix_targets
from jaxcifar.state import TrainState

Metrics = dict[str, jax.Array]


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augment: str = "crop-flip",
    cutout_size: int = 8,
    label_smoothing: float = 0.0,
    mix: MixSpec = NO_MIX,
    ema_decay: float | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer step: augment (+ MixUp/CutMix) + normalize on the device, train-mode forward, update.

    Returns the new state and ``{"loss_sum", "correct", "count"}`` (float32 scalars) of the batch;
    under mixing, ``correct`` counts agreement with each image's dominant label. With ``ema_decay``
    the state's EMA weights are updated after the step.
    """
    step_key = jax.random.fold_in(state.rng, state.step)
    images = transforms.augment(step_key, batch["image"], augment, cutout_size)
    images = transforms.normalize(images, mean, std)
    labels = batch["label"]
    images, lam = mix_batch(jax.random.fold_in(step_key, 1), images, state.step, mix)
    dominant = jnp.where(lam >= 0.5, labels, labels[::-1])

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float64 logits stay float64
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=dtype)
        if label_smoothing:
            targets = optax.smooth_labels(targets, label_smoothing)
        loss = optax.softmax_cross_entropy(logits.astype(dtype), mix_targets(targets, lam)).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if ema_decay is not None:
        state = state.update_ema(ema_decay)
    count = jnp.float32(labels.shape[0])
    metrics = {
        "loss_sum": loss * count,
        "correct": jnp.sum(jnp.argmax(logits, -1) == dominant).astype(jnp.float32),
        "count": count,
    }
    return state, metrics


_MIN_CHUNK = 32  # a batch with no divisor between this and the chunk size runs in one piece


def apply_in_chunks(apply: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int | None) -> jax.Array:
    """Returns ``apply(x)`` for a batch ``x`` (N, ...), computed over equal chunks of at most ``chunk``
    images with ``jax.lax.map`` (the largest divisor of N from ``_MIN_CHUNK`` on), or in one piece when
    ``chunk`` is None or no such divisor exists. Only for per-example functions (eval mode)."""
    n = x.shape[0]
    size = next((c for c in range(min(chunk or n, n), _MIN_CHUNK - 1, -1) if n % c == 0), n)
    if size >= n:
        return apply(x)
    out = jax.lax.map(apply, x.reshape(n // size, size, *x.shape[1:]))
    return out.reshape(n, *out.shape[2:])


def eval_step(
    state: TrainState,
    batch: Batch,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    tta: str = "none",
    ema: bool = False,
    chunk: int | None = None,
) -> Metrics:
    """Eval-mode forward of a (possibly padded) batch; ``batch["mask"]`` marks the real examples.

    ``tta`` averages the softmax over test-time views (``transforms.tta_views``) in one forward
    pass; ``ema`` evaluates the EMA weights; ``chunk`` runs the forward over chunks of at most that
    many images (``apply_in_chunks``; same result). Returns ``{"loss_sum", "correct", "count"}``
    over the real examples (float32 scalars); the loss is the NLL of the (averaged) probabilities.
    """
    images = transforms.normalize(batch["image"], mean, std)
    views = transforms.tta_views(images, tta)
    v, b = views.shape[:2]
    variables = state.variables(ema)
    logits = apply_in_chunks(
        lambda x: state.apply_fn(variables, x, train=False), views.reshape(v * b, *views.shape[2:]), chunk
    )
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32).reshape(v, b, -1), axis=-1)
    log_probs = jax.nn.logsumexp(log_probs, axis=0) - jnp.log(v)  # log of the mean probability
    mask = batch["mask"].astype(jnp.float32)
    losses = -jnp.take_along_axis(log_probs, batch["label"][:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(log_probs, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def make_train_step(
    mean: Sequence[float],
    std: Sequence[float],
    augment: str = "crop-flip",
    cutout_size: int = 8,
    label_smoothing: float = 0.0,
    mesh: Mesh | None = None,
    mix: MixSpec = NO_MIX,
    ema_decay: float | None = None,
    xla_options: dict[str, str] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns ``train_step`` jitted with these static settings, donating the state.

    With a ``mesh``, the state is replicated and the batch sharded over its ``data`` axis.
    ``xla_options`` defaults to ``backend.compiler_options()``.
    """

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return train_step(
            state,
            batch,
            mean=tuple(mean),
            std=tuple(std),
            augment=augment,
            cutout_size=cutout_size,
            label_smoothing=label_smoothing,
            mix=mix,
            ema_decay=ema_decay,
        )

    options = backend.compiler_options() if xla_options is None else xla_options
    if mesh is None:
        return jax.jit(step, donate_argnums=0, compiler_options=options)
    rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step, donate_argnums=0, in_shardings=(rep, data), out_shardings=(rep, rep), compiler_options=options)


def make_eval_step(
    mean: Sequence[float],
    std: Sequence[float],
    mesh: Mesh | None = None,
    tta: str = "none",
    ema: bool = False,
    xla_options: dict[str, str] | None = None,
) -> Callable[[TrainState, Batch], Metrics]:
    """Returns ``eval_step`` jitted for this normalization, TTA mode and weights (raw or EMA).

    The state is read, not donated (evaluation leaves it as it is). On one CPU device the forward
    runs in chunks (``backend.eval_chunk``). ``xla_options`` defaults to ``backend.compiler_options()``.
    """

    chunk = backend.eval_chunk(list(mesh.devices.flat) if mesh is not None else None)

    def step(state: TrainState, batch: Batch) -> Metrics:
        return eval_step(state, batch, mean=tuple(mean), std=tuple(std), tta=tta, ema=ema, chunk=chunk)

    options = backend.compiler_options() if xla_options is None else xla_options
    if mesh is None:
        return jax.jit(step, compiler_options=options)
    rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step, in_shardings=(rep, data), out_shardings=rep, compiler_options=options)
