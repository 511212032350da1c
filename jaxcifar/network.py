"""The network of a run: ``build_model(config)``, the Linen module with this machine's convolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn

from jaxcifar import backend, models
from jaxcifar.config import Config


def build_model(config: Config, devices: Sequence[Any] | None = None) -> nn.Module:
    """Returns the Linen module of ``config`` (model, width, classes, compute dtype) whose convolutions
    run ``config.conv_impl`` as chosen for ``devices`` (default: ``jax.devices()``; see ``jaxcifar.backend``)."""
    return models.get_model(
        config.model,
        num_classes=config.num_classes,
        width=config.width,
        dtype=models.COMPUTE_DTYPES[config.dtype],
        conv_general_dilated=backend.conv_general_dilated(config.conv_impl, devices),
    )
