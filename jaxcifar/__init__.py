"""jaxcifar: train and explain CIFAR image classifiers with JAX, Flax and optax.

Typical use::

    import jaxcifar
    config = jaxcifar.Config(epochs=20, workdir="runs/r18")
    state, history = jaxcifar.fit(config)

The names below are imported on first use (PEP 562), so ``import jaxcifar`` and the command lines
start without importing jax; the command lines can then take Ctrl-C from their first moment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "jaxcifar.errors",
    "Config": "jaxcifar.config",
    "ConfigError": "jaxcifar.errors",
    "DataError": "jaxcifar.errors",
    "Dataset": "jaxcifar.data",
    "DivergedError": "jaxcifar.errors",
    "FitResult": "jaxcifar.trainer",
    "JaxcifarError": "jaxcifar.errors",
    "RunFileError": "jaxcifar.errors",
    "Split": "jaxcifar.data",
    "TrainState": "jaxcifar.state",
    "build_model": "jaxcifar.trainer",
    "create_train_state": "jaxcifar.state",
    "evaluate": "jaxcifar.trainer",
    "fit": "jaxcifar.trainer",
    "load_dataset": "jaxcifar.data",
}

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "Dataset",
    "DivergedError",
    "FitResult",
    "JaxcifarError",
    "RunFileError",
    "Split",
    "TrainState",
    "build_model",
    "create_train_state",
    "evaluate",
    "fit",
    "load_dataset",
]

if TYPE_CHECKING:
    from jaxcifar.config import Config
    from jaxcifar.data import Dataset, Split, load_dataset
    from jaxcifar.errors import CheckpointError, ConfigError, DataError, DivergedError, JaxcifarError, RunFileError
    from jaxcifar.state import TrainState, create_train_state
    from jaxcifar.trainer import FitResult, build_model, evaluate, fit


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxcifar' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
