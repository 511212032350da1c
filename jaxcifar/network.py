"""The network of a run: ``build_model(config)``, the Linen module with this machine's convolution, and
``data_init``, the part of its initial weights that comes from the training images."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn

from jaxcifar import backend, models
from jaxcifar.config import Config
from jaxcifar.data import Dataset


def build_model(config: Config, devices: Sequence[Any] | None = None) -> nn.Module:
    """Returns the Linen module of ``config`` (model, width, classes, compute dtype) whose convolutions
    run ``config.conv_impl`` as chosen for ``devices`` (default: ``jax.devices()``) and the model (see
    ``jaxcifar.backend``)."""
    return models.get_model(
        config.model,
        num_classes=config.num_classes,
        width=config.width,
        dtype=models.COMPUTE_DTYPES[config.dtype],
        conv_general_dilated=backend.conv_general_dilated(config.conv_impl, devices, config.model),
    )


def data_init(model: nn.Module, dataset: Dataset) -> Callable[[Any], Any]:
    """Returns params -> params: the data-dependent part of ``model``'s init (``models.initial_params``, e.g.
    airbench's whitening filters) computed from ``dataset``'s training images; the identity for other models."""
    return functools.partial(
        models.initial_params, model, images=dataset.train.images, mean=dataset.mean, std=dataset.std
    )
