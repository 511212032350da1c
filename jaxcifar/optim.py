"""Optimizers and learning-rate schedules, built from optax pieces.

All schedules are functions of the optimizer step (one step per batch).
"""

from __future__ import annotations

import optax

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
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total)
    if config.schedule == "multistep":
        return optax.piecewise_constant_schedule(
            lr, {m * steps_per_epoch: config.gamma for m in sorted(config.milestones)}
        )
    if config.schedule == "warmup-cosine":
        warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=total)
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def make_optimizer(
    config: Config, schedule: optax.Schedule, momentum: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Returns the optax optimizer of ``config`` driven by ``schedule``.

    Order: clip the raw gradient (``grad_clip``), then weight decay, then the update rule.
    ``sgd``/``adam`` use coupled L2 (``g + wd * p``, PyTorch SGD/Adam ``weight_decay``);
    ``adamw`` uses decoupled decay (``p -= lr * wd * p``, PyTorch AdamW). A ``momentum`` schedule
    (SGD momentum, Adam beta1) is injected with ``optax.inject_hyperparams``; by default the
    momentum is the constant ``config.momentum``.
    """
    beta: float | optax.Schedule = config.momentum if momentum is None else momentum
    inject = optax.inject_hyperparams if momentum is not None else (lambda f, **_: f)
    parts: list[optax.GradientTransformation] = []
    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    if config.optimizer in ("sgd", "adam") and config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    if config.optimizer == "sgd":
        sgd = inject(optax.sgd, static_args=("nesterov",))
        parts.append(sgd(learning_rate=schedule, momentum=beta or None, nesterov=config.nesterov))
    elif config.optimizer == "adam":
        parts.append(inject(optax.adam)(learning_rate=schedule, b1=beta))
    elif config.optimizer == "adamw":
        parts.append(inject(optax.adamw)(learning_rate=schedule, b1=beta, weight_decay=config.weight_decay))
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    return optax.chain(*parts)


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
    return make_optimizer(config, schedule, momentum), schedule
