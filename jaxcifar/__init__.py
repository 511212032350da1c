"""jaxcifar: train and explain CIFAR image classifiers with JAX, Flax and optax.

Typical use::

    import jaxcifar
    config = jaxcifar.Config(epochs=20, workdir="runs/r18")
    state, history = jaxcifar.fit(config)
"""

from jaxcifar.config import Config
from jaxcifar.data import Dataset, Split, load_dataset
from jaxcifar.errors import CheckpointError, ConfigError, DataError, JaxcifarError
from jaxcifar.state import TrainState, create_train_state
from jaxcifar.trainer import FitResult, build_model, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "Dataset",
    "FitResult",
    "JaxcifarError",
    "Split",
    "TrainState",
    "build_model",
    "create_train_state",
    "evaluate",
    "fit",
    "load_dataset",
]
