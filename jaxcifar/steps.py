"""Jitted train and eval steps over device-resident uint8 batches.

``make_train_step`` / ``make_eval_step`` close over the static parts of the config and return
``jax.jit``-ed functions. The train step donates the state (updated in place on the device).
Metrics are sums over the batch (``loss_sum``, ``correct``, ``count``; the train step adds ``skipped``)
so that epochs and padded batches add up exactly.

A state with a ``dynamic_scale`` (``--dtype float16``) trains with dynamic loss scaling (flax's
``DynamicScale``, as flax's imagenet example): the loss is multiplied by the scale before the backward
pass and the float32 gradients divided by it; a step whose gradients are not all finite is skipped
(``skip_unless_finite``) and the scale halves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxcifar import backend, transforms
from jaxcifar.augmentation import AugmentSpec, augment_batch
from jaxcifar.batches import Batch
from jaxcifar.mesh import batch_sharded, replicated
from jaxcifar.mixing import NO_MIX, MixSpec, mix_batch, mix_targets
from jaxcifar.optim import param_name
from jaxcifar.state import TrainState

Metrics = dict[str, jax.Array]

_FLIP_COINS = 0xF11B  # folded into the run's key: the alternating flip's per-image coins

# Optimizer states that hold a schedule's position: they advance on a skipped step (see skip_unless_finite).
_SCHEDULE_STATES = (optax.ScaleByScheduleState,)
_INJECTED_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def skip_unless_finite(new: Any, old: Any, finite: jax.Array) -> Any:
    """Returns the pytree ``new`` where ``finite`` (a bool scalar) else ``old``, leaf by leaf (``jnp.where``:
    no conditional in the compiled step), except optax's schedule positions, which always take ``new``.

    The schedule positions are ``ScaleByScheduleState`` (an LR schedule handed to ``optax.sgd``/``adam``)
    and ``inject_hyperparams``' ``count``, ``hyperparams`` and their schedule states; the optimizer's
    other state (momentum, Adam's moments and its bias-correction count) keeps its old value. So a skipped
    step leaves the schedule where ``TrainState.step`` is, as PyTorch's per-batch ``scheduler.step()`` does
    after ``GradScaler`` skips ``optimizer.step()``.
    """

    def pick(n: Any, o: Any) -> Any:
        if isinstance(n, _SCHEDULE_STATES):
            return n
        if isinstance(n, _INJECTED_STATES):
            return n._replace(inner_state=skip_unless_finite(n.inner_state, o.inner_state, finite))
        return jnp.where(finite, n, o)

    return jax.tree.map(pick, new, old, is_leaf=lambda x: isinstance(x, _SCHEDULE_STATES + _INJECTED_STATES))


class Lookahead(NamedTuple):
    """airbench's Lookahead: every ``every`` steps the slow weights move to ``d * slow + (1 - d) * current``
    with ``d = decay * (step / total_steps)^3`` and the current weights are reset to them; at step
    ``total_steps`` the current weights become the slow ones. ``every`` 0 = off."""

    every: int = 0
    decay: float = 0.95**5
    total_steps: int = 1


NO_LOOKAHEAD = Lookahead()


def lookahead_update(state: TrainState, spec: Lookahead) -> TrainState:
    """Returns ``state`` after ``spec``'s Lookahead step at ``state.step`` (the steps done so far), for params
    and BatchNorm statistics alike (``state.lookahead`` holds the slow ones). No conditional: ``jnp.where``."""
    step = jnp.asarray(state.step)
    sync = step % spec.every == 0
    decay = spec.decay * (step.astype(jnp.float32) / spec.total_steps) ** 3
    current = {"params": state.params, "batch_stats": state.batch_stats}
    moved = optax.incremental_update(current, state.lookahead, 1.0 - decay)
    slow = jax.tree.map(lambda m, s: jnp.where(sync, m, s), moved, state.lookahead)
    reset = jnp.logical_or(sync, step >= spec.total_steps)
    current = jax.tree.map(lambda s, c: jnp.where(reset, s, c), slow, current)
    return state.replace(params=current["params"], batch_stats=current["batch_stats"], lookahead=slow)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augment: str | AugmentSpec = "crop-flip",
    cutout_size: int = 8,
    label_smoothing: float = 0.0,
    mix: MixSpec = NO_MIX,
    ema_decay: float | None = None,
    crop_padding: int = 4,
    pad_mode: str = "zeros",
    flip_epoch_steps: int = 0,
    lookahead: Lookahead = NO_LOOKAHEAD,
    constant_params: tuple[str, ...] = (),
) -> tuple[TrainState, Metrics]:
    """One optimizer step: augment (+ MixUp/CutMix) + normalize on the device, train-mode forward, update.

    ``augment`` is an ``AugmentSpec`` (crop, flip, policy, erasing, ...; ``jaxcifar.augmentation``) or one of
    ``transforms.AUGMENT_MODES`` with ``cutout_size``, ``crop_padding`` and ``pad_mode``.

    Returns the new state and ``{"loss_sum", "correct", "count", "skipped"}`` (float32 scalars) of the
    batch; under mixing, ``correct`` counts agreement with each image's dominant label. With ``ema_decay``
    the state's EMA weights are updated after the step. ``flip_epoch_steps`` > 0 (the steps per epoch)
    turns on the alternating flip (``transforms.alternating_flip`` of ``batch["index"]`` at epoch
    ``step // flip_epoch_steps``);
    ``lookahead.every`` > 0 applies ``lookahead_update`` after the step (the state keeps ``lookahead``).
    ``constant_params`` (``optim.param_name`` forms, e.g. ``("whiten/kernel", "whiten/bias")``) enter the
    forward pass as constants (``lax.stop_gradient``): their gradients are zeros and XLA drops the backward
    work that only they needed (for airbench once its whitening bias stops training: the first convolution's
    input gradient and the whitening layer's backward; experiments/cpu_speed_airbench run 9). Use it only for
    parameters the optimizer no longer moves, or the step changes what it trains.

    With ``state.dynamic_scale`` (float16) the gradients come from ``DynamicScale.value_and_grad`` (loss
    multiplied by the scale, float32 gradients divided by it). When they are not all finite the step is
    skipped: params, BatchNorm statistics, EMA weights and the optimizer's moments keep their values,
    ``skipped`` is 1 and the scale halves; ``step`` (batches consumed: the per-step RNG, the checkpoint's
    step and the schedule position) and the schedule advance (``skip_unless_finite``). ``loss_sum`` and
    ``correct`` still count the skipped batch: its forward pass ran on the current weights (a loss that
    is itself non-finite means the float16 forward overflowed, which the loop reports as divergence).
    ``skipped`` is 0 without a dynamic scale.
    """
    step_key = jax.random.fold_in(state.rng, state.step)
    flip = None
    if flip_epoch_steps:
        coin_key = jax.random.fold_in(state.rng, _FLIP_COINS)
        flip = transforms.alternating_flip(coin_key, batch["index"], state.step // flip_epoch_steps)
    spec = augment_spec(augment, cutout_size, crop_padding, pad_mode)
    images = augment_batch(step_key, batch["image"], spec, mean, flip)
    images = transforms.normalize(images, mean, std)
    labels = batch["label"]
    images, lam = mix_batch(jax.random.fold_in(step_key, 1), images, state.step, mix)
    dominant = jnp.where(lam >= 0.5, labels, labels[::-1])

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        params = _as_constants(params, constant_params)
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float64 logits stay float64
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=dtype)
        if label_smoothing:
            targets = optax.smooth_labels(targets, label_smoothing)
        loss = optax.softmax_cross_entropy(logits.astype(dtype), mix_targets(targets, lam)).mean()
        return loss, (logits, updates["batch_stats"])

    if state.dynamic_scale is None:
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        finite, dynamic_scale = jnp.array(True), None
    else:
        # the scale multiplies the float32 loss; its gradients come back float32 and divided by the scale
        dynamic_scale, finite, (loss, (logits, batch_stats)), grads = state.dynamic_scale.value_and_grad(
            loss_fn, has_aux=True
        )(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if ema_decay is not None:
        new_state = new_state.update_ema(ema_decay)
    if dynamic_scale is not None:
        new_state = _skip_step_unless_finite(new_state, state, finite).replace(dynamic_scale=dynamic_scale)
    if lookahead.every:
        new_state = lookahead_update(new_state, lookahead)
    count = jnp.float32(labels.shape[0])
    metrics = {
        "loss_sum": loss * count,
        "correct": jnp.sum(jnp.argmax(logits, -1) == dominant).astype(jnp.float32),
        "count": count,
        "skipped": jnp.logical_not(finite).astype(jnp.float32),
    }
    return new_state, metrics


def _skip_step_unless_finite(new_state: TrainState, state: TrainState, finite: jax.Array) -> TrainState:
    """Returns ``new_state`` where ``finite``, else ``new_state`` with ``state``'s params, BatchNorm statistics,
    optimizer state and EMA weights (its step and everything else from ``new_state``)."""
    return new_state.replace(
        params=skip_unless_finite(new_state.params, state.params, finite),
        batch_stats=skip_unless_finite(new_state.batch_stats, state.batch_stats, finite),
        opt_state=skip_unless_finite(new_state.opt_state, state.opt_state, finite),
        ema_params=skip_unless_finite(new_state.ema_params, state.ema_params, finite),
        ema_batch_stats=skip_unless_finite(new_state.ema_batch_stats, state.ema_batch_stats, finite),
    )


def _as_constants(params: Any, names: tuple[str, ...]) -> Any:
    """Returns ``params`` with the leaves named in ``names`` (``optim.param_name``) under ``lax.stop_gradient``."""
    if not names:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jax.lax.stop_gradient(leaf) if param_name(path) in names else leaf, params
    )


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

    ``tta`` combines the predictions of test-time views (``transforms.tta_views``) in one forward
    pass; ``ema`` evaluates the EMA weights; ``chunk`` runs the forward over chunks of at most that
    many images (``apply_in_chunks``; same result). Returns ``{"loss_sum", "correct", "count"}``
    over the real examples (float32 scalars); the loss is the NLL of the (combined) probabilities.
    With a ``tta`` other than ``none`` it also returns ``plain_loss_sum`` and ``plain_correct``: the
    same sums for the first view alone, the unaltered images (the plain evaluation, at no extra forward).
    """
    images = transforms.normalize(batch["image"], mean, std)
    views = transforms.tta_views(images, tta)
    v, b = views.shape[:2]
    variables = state.variables(ema)
    logits = apply_in_chunks(
        lambda x: state.apply_fn(variables, x, train=False), views.reshape(v * b, *views.shape[2:]), chunk
    ).reshape(v, b, -1)
    mask = batch["mask"].astype(jnp.float32)
    loss_sum, correct = _nll_and_correct(transforms.tta_log_probs(logits, tta), batch["label"], mask)
    metrics = {"loss_sum": loss_sum, "correct": correct, "count": jnp.sum(mask)}
    if v > 1:
        plain_log_probs = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        metrics["plain_loss_sum"], metrics["plain_correct"] = _nll_and_correct(plain_log_probs, batch["label"], mask)
    return metrics


def _nll_and_correct(log_probs: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns the masked sums of the NLL and of the correct predictions of ``log_probs`` (B, K) (scalars)."""
    losses = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(log_probs, -1) == labels).astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(correct * mask)


def augment_spec(
    augment: str | AugmentSpec, cutout_size: int = 8, crop_padding: int = 4, pad_mode: str = "zeros"
) -> AugmentSpec:
    """``augment`` itself (which then carries its own crop settings), or the ``AugmentSpec`` of an
    ``AUGMENT_MODES`` name with this cutout size and crop padding."""
    if isinstance(augment, AugmentSpec):
        return augment
    return AugmentSpec(mode=augment, cutout_size=cutout_size, crop_padding=crop_padding, pad_mode=pad_mode)


def make_train_step(
    mean: Sequence[float],
    std: Sequence[float],
    augment: str | AugmentSpec = "crop-flip",
    cutout_size: int = 8,
    label_smoothing: float = 0.0,
    mesh: Mesh | None = None,
    mix: MixSpec = NO_MIX,
    ema_decay: float | None = None,
    xla_options: dict[str, str] | None = None,
    crop_padding: int = 4,
    pad_mode: str = "zeros",
    flip_epoch_steps: int = 0,
    lookahead: Lookahead = NO_LOOKAHEAD,
    constant_params: tuple[str, ...] = (),
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
            crop_padding=crop_padding,
            pad_mode=pad_mode,
            flip_epoch_steps=flip_epoch_steps,
            lookahead=lookahead,
            constant_params=tuple(constant_params),
        )

    options = backend.compiler_options() if xla_options is None else xla_options
    if mesh is None:
        return jax.jit(step, donate_argnums=0, compiler_options=options)
    rep, data = replicated(mesh), batch_sharded(mesh)
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
    rep, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(step, in_shardings=(rep, data), out_shardings=rep, compiler_options=options)
