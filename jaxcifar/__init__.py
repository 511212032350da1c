"""jaxcifar: train and explain CIFAR image classifiers with JAX, Flax and optax.

Typical use::

    import jaxcifar
    config = jaxcifar.Config(epochs=20, workdir="runs/r18", report=True)
    result = jaxcifar.run(config)  # LR range test (lr="auto"), training, report
    # or its parts: jaxcifar.fit(config) (lr a number), jaxcifar.make_report(config.workdir)

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
    "FitResult": "jaxcifar.loop",
    "JaxcifarError": "jaxcifar.errors",
    "RunFileError": "jaxcifar.errors",
    "Split": "jaxcifar.data",
    "TrainState": "jaxcifar.state",
    "ReportOptions": "jaxcifar.report",
    "RunResult": "jaxcifar.pipeline",
    "build_model": "jaxcifar.network",
    "create_train_state": "jaxcifar.state",
    "evaluate": "jaxcifar.evaluation",
    "fit": "jaxcifar.loop",
    "load_dataset": "jaxcifar.data",
    "make_report": "jaxcifar.report",
    "run": "jaxcifar.pipeline",
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
    "ReportOptions",
    "RunFileError",
    "RunResult",
    "Split",
    "TrainState",
    "build_model",
    "create_train_state",
    "evaluate",
    "fit",
    "load_dataset",
    "make_report",
    "run",
]

if TYPE_CHECKING:
    from jaxcifar.config import Config
    from jaxcifar.data import Dataset, Split, load_dataset
    from jaxcifar.errors import CheckpointError, ConfigError, DataError, DivergedError, JaxcifarError, RunFileError
    from jaxcifar.evaluation import evaluate
    from jaxcifar.loop import FitResult, fit
    from jaxcifar.network import build_model
    from jaxcifar.pipeline import RunResult, run
    from jaxcifar.report import ReportOptions, make_report
    from jaxcifar.state import TrainState, create_train_state


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxcifar' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
