"""The tiny runs the tests train, as Config fields and as command-line flags.

``TINY_RUN`` is a few steps of a width-4 ResNet18 on the synthetic problem (it compiles in seconds); a test
takes ``tiny_run(**changes)`` and, for a command line, ``flags(**fields)``. This module imports no jax
(``experiments/`` scripts reach it through ``tests.test_chaos``), and does nothing when imported.
"""

from __future__ import annotations

from typing import Any

from jaxcifar.cli import config_to_argv
from jaxcifar.config import Config

# 128 images in batches of 32: 4 onecycle steps an epoch.
TINY_RUN: dict[str, Any] = dict(
    data_source="synthetic",
    width=4,
    batch_size=32,
    eval_batch_size=64,
    train_subset=128,
    test_subset=64,
    epochs=1,
    lr=0.05,
)

# The session run of the ``synthetic_run`` fixture (tests/conftest.py): 4 epochs of width 8, 16 steps each.
SYNTHETIC_RUN: dict[str, Any] = dict(
    data_source="synthetic",
    width=8,
    epochs=4,
    batch_size=32,
    train_subset=512,
    test_subset=128,
    lr=0.05,
    keep_checkpoints=4,
    log_every=4,
)


def tiny_run(**changes: Any) -> dict[str, Any]:
    """Returns ``TINY_RUN``'s Config fields with ``changes`` applied (a new dict)."""
    return {**TINY_RUN, **changes}


def flags(**fields: Any) -> list[str]:
    """Returns the command-line flags of ``Config(**fields)`` (``cli.config_to_argv``: the fields that differ
    from Config's defaults). Raises ConfigError for fields Config refuses."""
    return config_to_argv(Config(**fields))
