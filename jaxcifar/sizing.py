"""Will a run fit in memory? An estimate made before any work, so that absurd sizes end in one line.

The estimate is deliberately rough (it is for refusing ``--eval-batch-size 2000000000`` or
``--width 30000`` at once, not for tuning): the parameter count comes from ``jax.eval_shape`` of the
model's ``init`` (no memory is allocated), the activations from the ResNet's shape (BasicBlock
stages at 32x32, 16x16, 8x8, 4x4 with width x 1, 2, 4, 8 channels; about three tensors kept per
convolution for the backward pass); for other models, every module output of a train-mode forward
(``capture_intermediates`` under ``jax.eval_shape``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxcifar import models, transforms
from jaxcifar.config import Config
from jaxcifar.errors import ConfigError

TENSORS_PER_CONV = 3  # conv output, BatchNorm output, ReLU output (kept for the backward pass)


def param_count(model: Any, image_shape: tuple[int, int, int] = (32, 32, 3)) -> int:
    """Returns the number of parameters of ``model`` without allocating them (``jax.eval_shape``)."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False)["params"]
    )
    return sum(int(x.size) for x in jax.tree.leaves(shapes))


def train_activation_values(config: Config) -> int:
    """Returns about how many activation values one training image keeps for the backward pass."""
    blocks = getattr(models.get_model(config.model), "stage_sizes", None)
    if blocks is None:
        return module_output_values(models.get_model(config.model, width=config.width))
    # Stage i holds (32 / 2^i)^2 x width x 2^i = 1024 x width / 2^i values per feature map.
    convs = 1 + sum(2 * n / 2**i for i, n in enumerate(blocks))  # the stem, and two convs per block
    return int(TENSORS_PER_CONV * 1024 * config.width * convs)


def module_output_values(model: Any, image_shape: tuple[int, int, int] = (32, 32, 3)) -> int:
    """Returns how many values all module outputs of a train-mode forward of one image hold (``jax.eval_shape``)."""

    def forward() -> Any:
        x = jnp.zeros((1, *image_shape))
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        return model.apply(
            variables, x, train=True, capture_intermediates=True, mutable=["intermediates", "batch_stats"]
        )[1]["intermediates"]

    return sum(int(x.size) for x in jax.tree.leaves(jax.eval_shape(forward)))


def device_memory_bytes(device: Any) -> int | None:
    """Returns the memory one device can use: the accelerator's limit, or the host's RAM on CPU."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend implements memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def _gb(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB"


def check_fits(config: Config, model: Any, devices: list[Any]) -> None:
    """Raises ConfigError when the model, a train batch or an eval batch of ``config`` cannot fit on one
    of ``devices`` (the batch split over them, the state replicated), naming what it would need."""
    available = device_memory_bytes(devices[0])
    if available is None:
        return
    value_bytes = jnp.dtype(models.COMPUTE_DTYPES[config.dtype]).itemsize
    params = param_count(model)
    copies = 3 + (config.optimizer != "sgd") + (config.ema_decay is not None)  # params, grads, moments, EMA
    state_bytes = params * 4 * copies
    where = f"the {_gb(available)} of this {devices[0].platform} device"
    if state_bytes > available:
        raise ConfigError(
            f"--width {config.width}: {config.model} has {params:,} parameters and needs about "
            f"{_gb(state_bytes)} for its training state, more than {where}; use a smaller --width"
        )
    per_train_image = train_activation_values(config) * value_bytes + 32 * 32 * 3 * 4
    per_eval_image = transforms.tta_view_count(config.tta) * (32 * 32 * 3 + 2 * 1024 * config.width) * 4
    for flag, batch, per_image in (
        ("--batch-size", config.batch_size, per_train_image),
        ("--eval-batch-size", config.eval_batch_size, per_eval_image),
    ):
        needed = state_bytes + -(-batch // len(devices)) * per_image
        if needed > available:
            most = max(0, (available - state_bytes) // per_image) * len(devices)
            raise ConfigError(
                f"{flag} {batch} needs about {_gb(needed)} per device, more than {where}; use at most about {most}"
            )
