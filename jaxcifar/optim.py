"""Optimizers and learning-rate schedules, built from optax pieces.

All schedules are functions of the optimizer step (one step per batch).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxcifar import models
from jaxcifar.config import Config
from jaxcifar.errors import ConfigError


def onecycle_schedule(
    total_steps: int,
    max_lr: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> optax.Schedule:
    """PyTorch ``OneCycleLR(anneal_strategy='cos', three_phase=False)`` as an optax schedule.

    Starts at ``max_lr / div_factor``, reaches ``max_lr`` at step ``pct_start * total_steps - 1``
    and ``max_lr / (div_factor * final_div_factor)`` at step ``total_steps - 1`` (cosine
    interpolation in both phases), exactly PyTorch's step positions. (``optax.cosine_onecycle_schedule``
    places the peak and the end one step later.) Returns a function step -> float32 LR.
    """
    initial = max_lr / div_factor
    peak_step = float(pct_start * total_steps) - 1.0
    end_step = float(total_steps - 1)
    if peak_step <= 0 or end_step <= peak_step:
        raise ConfigError(
            f"--schedule onecycle needs more than {1 / pct_start:.0f} steps with --pct-start {pct_start}, got "
            f"{total_steps} (epochs x steps per epoch); train longer, on more data, or use another --schedule"
        )
    return optax.piecewise_interpolate_schedule(
        "cosine",
        init_value=initial,
        boundaries_and_scales={peak_step: div_factor, end_step: 1.0 / (div_factor * final_div_factor)},
    )


def onecycle_momentum_schedule(
    total_steps: int, base_momentum: float = 0.85, max_momentum: float = 0.95, pct_start: float = 0.3
) -> optax.Schedule:
    """Momentum of PyTorch ``OneCycleLR(cycle_momentum=True)``: the mirror image of the LR cycle.

    ``max_momentum`` at step 0, ``base_momentum`` at the LR peak (step ``pct_start * total - 1``),
    ``max_momentum`` again at step ``total - 1``, cosine in between. Returns step -> float32.
    """
    peak_step = float(pct_start * total_steps) - 1.0
    return optax.piecewise_interpolate_schedule(
        "cosine",
        init_value=max_momentum,
        boundaries_and_scales={
            peak_step: base_momentum / max_momentum,
            float(total_steps - 1): max_momentum / base_momentum,
        },
    )


def linear_onecycle_schedule(
    total_steps: int, max_lr: float, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4
) -> optax.Schedule:
    """The piecewise-linear one-cycle of Page's ResNet-9 and airbench94: ``max_lr / div_factor`` at step 0,
    ``max_lr`` at step ``int(pct_start * total_steps)``, then linearly to ``max_lr / (div_factor *
    final_div_factor)`` at step ``total_steps`` (airbench94: pct_start 0.23, div_factor 5, final_div_factor
    0.2 / 0.07). Returns a function step -> float32 LR."""
    peak_step = int(pct_start * total_steps)
    if peak_step <= 0 or peak_step >= total_steps:
        raise ConfigError(
            f"--schedule linear-onecycle needs int(--pct-start x steps) in [1, steps), got {peak_step} of "
            f"{total_steps} steps; train longer or change --pct-start"
        )
    return optax.piecewise_interpolate_schedule(
        "linear",
        init_value=max_lr / div_factor,
        boundaries_and_scales={peak_step: div_factor, total_steps: 1.0 / (div_factor * final_div_factor)},
    )


def peak_lr(config: Config) -> float:
    """Returns ``config.lr`` as a float. ConfigError for ``"auto"``: the LR range test resolves it before
    any schedule is built (``jaxcifar.run``; ``python -m jaxcifar.train --lr auto``)."""
    if isinstance(config.lr, str):
        raise ConfigError(f"--lr {config.lr}: resolve it with the LR range test first (jaxcifar.run does)")
    return float(config.lr)


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """Returns the LR schedule of ``config`` over ``config.epochs * steps_per_epoch`` steps."""
    total, lr = config.epochs * steps_per_epoch, peak_lr(config)
    if config.schedule == "onecycle":
        return onecycle_schedule(total, lr, config.pct_start, config.div_factor, config.final_div_factor)
    if config.schedule == "linear-onecycle":
        return linear_onecycle_schedule(total, lr, config.pct_start, config.div_factor, config.final_div_factor)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total)
    if config.schedule == "multistep":
        return optax.piecewise_constant_schedule(
            lr, {m * steps_per_epoch: config.gamma for m in sorted(config.milestones)}
        )
    if config.schedule == "warmup-cosine":
        warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=total)
    if config.schedule == "linear":
        return optax.linear_schedule(lr, 0.0, transition_steps=total)
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def coupled_weight_decay(config: Config) -> float:
    """Returns the L2 coefficient added to the gradient (``g + c * p``, before momentum) for sgd and adam.

    ``config.weight_decay`` itself, or with ``decoupled_weight_decay`` (airbench's parametrization: weight
    decay per 1024 examples, decoupled from the peak LR and the momentum) ``c = weight_decay * batch_size
    / (1024 * (1 + 1 / (1 - momentum)) * lr)``: a step then decays the weights by about ``weight_decay *
    batch_size / 1024`` times the schedule's relative LR, whatever ``--lr`` and ``--momentum`` are
    (airbench94: 0.0153 / 11.5 for lr 1.5 and momentum 0.85).
    """
    if not config.decoupled_weight_decay:
        return config.weight_decay
    amplification = 1.0 + 1.0 / (1.0 - config.momentum)  # a Nesterov step's size relative to a constant gradient
    return config.weight_decay * config.batch_size / (1024.0 * amplification * peak_lr(config))


_NORM_MODULE = re.compile(r"(^|_)(bn|norm)\d*$")  # BatchNorm modules: bn1, shortcut_bn, norm2, bn


def param_name(path: tuple[Any, ...]) -> str:
    """Returns the ``/``-joined module and parameter names of a ``jax.tree_util`` key path into a params tree,
    the form of a model's ``frozen_params`` and ``early_params`` (e.g. ``"whiten/bias"``)."""
    return "/".join(_key_names(path))


def _key_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """Returns the module and parameter names of a ``jax.tree_util`` key path, outermost first."""
    return tuple(str(getattr(k, "key", k)) for k in path)


def late_frozen_params(model: str) -> tuple[str, ...]:
    """Returns the parameters of ``model`` that stay constant once its early parameters stop training (after
    ``--whiten-bias-epochs``): its ``frozen_params`` and ``early_params`` (``()`` when it has no early ones)."""
    module = models.get_model(model)
    early = tuple(getattr(module, "early_params", ()))
    return (*getattr(module, "frozen_params", ()), *early) if early else ()


def param_label(path: tuple[Any, ...], model: str, ndim: int = 0, muon: bool = False) -> str:
    """Returns the optimizer group of the parameter at ``path`` (a ``jax.tree_util`` key path) of ``model``:
    ``frozen`` (the model's ``frozen_params``, e.g. airbench's whitening filters: never updated),
    ``early`` (its ``early_params``, e.g. the whitening bias: trained for ``--whiten-bias-epochs``),
    ``muon`` (with ``muon``, a convolution kernel: ``ndim`` 4), ``norm_bias`` (the bias of a BatchNorm
    module) or ``default``."""
    names = _key_names(path)
    module = models.get_model(model)
    joined = "/".join(names)
    if joined in getattr(module, "frozen_params", ()):
        return "frozen"
    if joined in getattr(module, "early_params", ()):
        return "early"
    if muon and ndim == 4:
        return "muon"
    if names[-1] == "bias" and len(names) >= 2 and _NORM_MODULE.search(names[-2]):
        return "norm_bias"
    return "default"


MUON_NS_STEPS = 3  # Newton-Schulz iterations per step, as airbench94_muon (optax's default is 5)
# An HWIO kernel as a matrix for Muon: rows (kh, kw, C_in), columns C_out, as airbench reshapes (C_out, C_in*kh*kw).
_CONV_MATRIX = optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)


def muon_for_filters(config: Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Returns Muon (``optax.contrib.muon``) for convolution kernels: Nesterov momentum ``muon_momentum``, the
    update orthogonalized by ``MUON_NS_STEPS`` Newton-Schulz iterations on the (kh*kw*C_in, C_out) matrix, at
    ``muon_lr`` x the schedule's relative LR (``schedule(step) / lr``); no weight decay (airbench94_muon).
    With ``muon_normalize`` each kernel is first rescaled to norm sqrt(C_out) (``normalize_kernels``)."""
    peak = peak_lr(config)
    muon = optax.contrib.muon(
        learning_rate=lambda step: config.muon_lr * schedule(step) / peak,
        ns_steps=MUON_NS_STEPS,
        beta=config.muon_momentum,
        nesterov=True,
        muon_weight_dimension_numbers=lambda params: jax.tree.map(lambda _: _CONV_MATRIX, params),
    )
    return optax.chain(muon, normalize_kernels()) if config.muon_normalize else muon


def normalize_kernels() -> optax.GradientTransformation:
    """Returns a stateless transformation that adds ``p * (sqrt(C_out) / ||p|| - 1)`` to each HWIO kernel ``p``'s
    update, so that ``p + update`` is the kernel rescaled to Frobenius norm sqrt(C_out), then moved by the incoming
    update: airbench94_muon's Muon step ``p <- p * sqrt(C_out) / ||p||; p <- p - lr * U`` (a zero kernel stays
    as it is). Put it after the transformation that computes ``-lr * U``."""

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        if params is None:
            raise ValueError("normalize_kernels needs the parameters: pass params to update()")

        def rescale(u: jax.Array, p: jax.Array) -> jax.Array:
            norm = jnp.linalg.norm(p.astype(jnp.float32))
            factor = jnp.where(norm > 0, jnp.sqrt(jnp.float32(p.shape[-1])) / jnp.maximum(norm, 1e-30), 1.0)
            return u + (p * (factor - 1.0)).astype(u.dtype)

        return jax.tree.map(rescale, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _update_rule(
    config: Config, schedule: optax.Schedule, momentum: optax.Schedule | None, lr_scale: float = 1.0
) -> list[optax.GradientTransformation]:
    """Weight decay (divided by ``lr_scale``) and the update rule at ``lr_scale`` x the schedule."""
    beta: float | optax.Schedule = config.momentum if momentum is None else momentum
    inject = optax.inject_hyperparams if momentum is not None else (lambda f, **_: f)
    lr = schedule if lr_scale == 1.0 else (lambda step: lr_scale * schedule(step))
    parts: list[optax.GradientTransformation] = []
    decay = coupled_weight_decay(config) / lr_scale
    if config.optimizer in ("sgd", "adam") and decay > 0:
        parts.append(optax.add_decayed_weights(decay))
    if config.optimizer == "sgd":
        sgd = inject(optax.sgd, static_args=("nesterov",))
        parts.append(sgd(learning_rate=lr, momentum=beta or None, nesterov=config.nesterov))
    elif config.optimizer == "adam":
        parts.append(inject(optax.adam)(learning_rate=lr, b1=beta))
    elif config.optimizer == "adamw":
        parts.append(inject(optax.adamw)(learning_rate=lr, b1=beta, weight_decay=config.weight_decay / lr_scale))
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    return parts


def make_optimizer(
    config: Config, schedule: optax.Schedule, momentum: optax.Schedule | None = None, steps_per_epoch: int = 0
) -> optax.GradientTransformation:
    """Returns the optax optimizer of ``config`` driven by ``schedule``.

    Order: clip the raw gradient (``grad_clip``), then weight decay, then the update rule.
    ``sgd``/``adam`` use coupled L2 (``g + wd * p``, PyTorch SGD/Adam ``weight_decay``; see
    ``coupled_weight_decay`` for ``--decoupled-weight-decay``); ``adamw`` uses decoupled decay
    (``p -= lr * wd * p``, PyTorch AdamW). A ``momentum`` schedule (SGD momentum, Adam beta1) is injected
    with ``optax.inject_hyperparams``; by default the momentum is the constant ``config.momentum``.

    Parameter groups (``param_label``, through ``optax.multi_transform`` after the clip, which sees all the
    gradients) where the model or config asks for them: a model's frozen parameters get no update
    (``optax.set_to_zero``), its early ones none after ``whiten_bias_epochs * steps_per_epoch`` steps (all
    the run when ``steps_per_epoch`` is 0; at ``whiten_bias_lr_mult`` x the LR, falling linearly to 0 over those
    steps with ``whiten_bias_decay``), and BatchNorm biases train at ``bn_bias_lr_mult`` x the LR with
    the weight decay divided by it (the same decay per step); with ``muon_lr`` > 0 the convolution kernels
    train with ``muon_for_filters``.
    Without groups the optimizer is the plain chain (same state layout as before groups existed).
    """
    clip = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []  # over all groups at once
    rule = _update_rule(config, schedule, momentum)
    module = models.get_model(config.model)
    special = getattr(module, "frozen_params", ()) or getattr(module, "early_params", ()) or config.muon_lr > 0
    if not special and config.bn_bias_lr_mult == 1.0:
        return optax.chain(*clip, *rule)
    early_steps = config.whiten_bias_epochs * steps_per_epoch if steps_per_epoch else None
    early_schedule = schedule
    if config.whiten_bias_decay and early_steps:
        early_schedule = optax.linear_schedule(peak_lr(config), 0.0, transition_steps=early_steps)
    early = _update_rule(config, early_schedule, momentum, config.whiten_bias_lr_mult)
    if early_steps is not None:
        early.append(optax.scale_by_schedule(lambda step: (step < early_steps).astype(float)))
    transforms = {
        "default": optax.chain(*rule),
        "frozen": optax.set_to_zero(),
        "early": optax.chain(*early),
        "norm_bias": optax.chain(*_update_rule(config, schedule, momentum, config.bn_bias_lr_mult)),
    }
    if config.muon_lr > 0:
        transforms["muon"] = muon_for_filters(config, schedule)
    muon = config.muon_lr > 0

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: param_label(path, config.model, jnp.ndim(leaf), muon), params
        )

    return optax.chain(*clip, optax.multi_transform(transforms, labels))


def make_training_optimizer(
    config: Config, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, LR schedule) of a run: ``make_schedule`` + ``make_optimizer``, with the
    OneCycle momentum schedule when ``config.cycle_momentum``."""
    schedule = make_schedule(config, steps_per_epoch)
    momentum = None
    if config.cycle_momentum:
        momentum = onecycle_momentum_schedule(
            config.epochs * steps_per_epoch, config.base_momentum, config.max_momentum, config.pct_start
        )
    return make_optimizer(config, schedule, momentum, steps_per_epoch), schedule
