"""``jaxcifar.names``: Config validates its names without jax, and every registry lists exactly those names."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcifar import models, names, optim, transforms
from jaxcifar.config import Config

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "flax", "optax", "orbax", "chex", "numpy", "torch", "tensorboardX")
# The modules importing jaxcifar.config may load: itself, the (lazy, PEP 562) package and stdlib-only leaves.
LEAVES = {"jaxcifar", "jaxcifar.config", "jaxcifar.names", "jaxcifar.errors", "jaxcifar.files", "jaxcifar.console"}


def test_config_imports_no_heavy_package():
    """In a fresh interpreter (this one has jax loaded already), ``import jaxcifar.config`` and building and
    validating a Config load no heavy package and no jaxcifar module beyond the leaves. ``jaxcifar/__init__``
    imports its exports on first use, so this measures config's own imports, not the package's."""
    code = (
        "import sys, json, jaxcifar.config as c; c.Config(model='resnet9', dtype='bfloat16', policy='randaugment'); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('jaxcifar', *sys.argv[1:]))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *HEAVY], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(result.stdout))
    assert sorted({m.split(".")[0] for m in loaded} & set(HEAVY)) == []
    assert loaded - LEAVES == set()
    assert "jaxcifar.config" in loaded  # the probe really imported it


def test_the_models_registry_lists_the_configs_model_and_dtype_names():
    assert sorted(models._REGISTRY) == sorted(names.MODELS)  # registered but not listed, or listed but not registered
    assert models.available_models() == names.MODELS  # sorted: the order --help lists them in
    assert sorted(models.COMPUTE_DTYPES) == sorted(names.DTYPES)


def test_a_model_listed_but_not_registered_stops_the_models_import():
    """The import-time check: a name in ``names.MODELS`` without a model would otherwise pass Config and fail
    later, inside a run."""
    code = "import jaxcifar.names as n; n.MODELS += ('resnet50',); import jaxcifar.models"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError: jaxcifar.models registers" in result.stderr and "'resnet50'" in result.stderr


def test_the_tta_table_lists_the_configs_tta_names():
    assert transforms.TTA_MODES == names.TTA_MODES


@pytest.mark.parametrize("schedule", names.SCHEDULES)
def test_every_schedule_name_builds_a_schedule(schedule):
    lr = optim.make_schedule(Config(schedule=schedule, epochs=2, lr=0.1), steps_per_epoch=10)(5)
    assert 0.0 <= float(lr) <= 0.1 + 1e-6  # float32


@pytest.mark.parametrize("optimizer", names.OPTIMIZERS)
def test_every_optimizer_name_builds_an_optimizer(optimizer):
    config = Config(optimizer=optimizer, lr=0.1)
    tx = optim.make_optimizer(config, optim.make_schedule(config, steps_per_epoch=10))
    assert tx.init({"w": 0.0}) is not None


def test_the_config_choices_are_the_names():
    """Config's fields take their choices from ``names`` (what --help and docs/cli.md list)."""
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(Config)}
    assert choices["model"] is names.MODELS and choices["dtype"] is names.DTYPES
    assert choices["policy"] is names.POLICIES and choices["tta"] is names.TTA_MODES
