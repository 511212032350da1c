"""Model zoo: ``get_model(name, **kwargs)`` builds a Flax Linen module by name.

A model is a Linen module (one file in ``models/``) with the fields ``num_classes``, ``width``, ``dtype`` and
``conv_general_dilated``, called as ``apply(variables, images, train)``; it sows and perturbs its stage
outputs by name and names its Grad-CAM layer (at least 5x5 on 32x32 inputs) in the class variable
``gradcam_layer``. A model whose initial weights depend on the training data (airbench's whitening
filters) has a static ``params_from_data(params, images, mean, std) -> params``, which the run calls
on its training images right after the random init (``initial_params``). A model whose train step runs
faster on one CPU device with XLA's own convolution gradients says so with ``cpu_auto_conv = "lax"``
(``cpu_auto_conv``; ``--conv-impl auto`` then uses them). Registering it is one line in
``_REGISTRY`` and its name in ``jaxcifar.names.MODELS`` (what ``Config`` accepts; checked at import).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxcifar.models.airbench import AirbenchNet
from jaxcifar.models.resnet import STAGE_NAMES, BasicBlock, ResNet, ResNet18, ResNet34
from jaxcifar.models.resnet9 import ResNet9
from jaxcifar.names import DTYPES, MODELS

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet9": ResNet9,
    "airbench": AirbenchNet,
}


# Config.dtype / --dtype name -> the modules' compute dtype (parameters stay float32 either way). float16
# trains with dynamic loss scaling (jaxcifar.state.default_dynamic_scale gives a float16 model's state one).
COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Config validates names without importing jax (jaxcifar.names): the registries must list the same ones.
for _registry, _names in ((_REGISTRY, MODELS), (COMPUTE_DTYPES, DTYPES)):
    if sorted(_registry) != sorted(_names):
        raise ImportError(f"jaxcifar.models registers {sorted(_registry)} but jaxcifar.names lists {sorted(_names)}")


def available_models() -> tuple[str, ...]:
    """Returns the names ``get_model`` accepts, sorted."""
    return tuple(sorted(_REGISTRY))


def get_model(name: str, **kwargs) -> nn.Module:
    """Returns the Linen module called ``name`` (case-insensitive) built with ``kwargs``.

    ``kwargs`` are the module's fields, e.g. ``num_classes``, ``width``, ``dtype``.
    Raises ValueError naming the known models when ``name`` is unknown.
    """
    return _model_class(name)(**kwargs)


def _model_class(name: str) -> Callable[..., nn.Module]:
    """Returns the registered class called ``name`` (case-insensitive); ValueError naming the known models."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _REGISTRY[key]


def gradcam_layer(model: nn.Module) -> str:
    """Returns the name of ``model``'s default Grad-CAM layer (its ``gradcam_layer``; ``layer3`` for others)."""
    return getattr(model, "gradcam_layer", "layer3")


def cpu_auto_conv(name: str) -> str:
    """Returns what ``--conv-impl auto`` gives the model called ``name`` on one CPU device: its class variable
    ``cpu_auto_conv`` (``"lax"``: XLA's own gradients everywhere), else ``"per-shape"`` (``jaxcifar.backend``'s
    routing, measured on ResNet18). Raises ValueError for an unknown name."""
    return getattr(_model_class(name), "cpu_auto_conv", "per-shape")


def initial_params(model: nn.Module, params: Any, images: Any, mean: Any, std: Any) -> Any:
    """Returns ``params`` with the data-dependent part of ``model``'s init computed from ``images`` (uint8
    (N, H, W, 3) training images, normalized with ``mean``/``std``): ``model.params_from_data`` where the
    model has one, else ``params`` unchanged."""
    from_data = getattr(type(model), "params_from_data", None)
    return params if from_data is None else from_data(params, images, mean, std)


__all__ = [
    "COMPUTE_DTYPES",
    "STAGE_NAMES",
    "AirbenchNet",
    "BasicBlock",
    "ResNet",
    "ResNet9",
    "ResNet18",
    "ResNet34",
    "available_models",
    "cpu_auto_conv",
    "get_model",
    "gradcam_layer",
    "initial_params",
]
