"""Model zoo: ``get_model(name, **kwargs)`` builds a Flax Linen module by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxcifar.models.resnet import STAGE_NAMES, BasicBlock, ResNet, ResNet18, ResNet34

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
}


# Config.dtype / --dtype name -> the modules' compute dtype (parameters stay float32 either way). float16
# trains with dynamic loss scaling (jaxcifar.state.default_dynamic_scale gives a float16 model's state one).
COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def available_models() -> tuple[str, ...]:
    """Returns the names ``get_model`` accepts, sorted."""
    return tuple(sorted(_REGISTRY))


def get_model(name: str, **kwargs) -> nn.Module:
    """Returns the Linen module called ``name`` (case-insensitive) built with ``kwargs``.

    ``kwargs`` are the module's fields, e.g. ``num_classes``, ``width``, ``dtype``.
    Raises ValueError naming the known models when ``name`` is unknown.
    """
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _REGISTRY[key](**kwargs)


__all__ = [
    "COMPUTE_DTYPES",
    "STAGE_NAMES",
    "BasicBlock",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "available_models",
    "get_model",
]
