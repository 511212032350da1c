"""Optional PyTorch dependencies of the tests: skipped without them, required in CI.

``require("torch")`` is ``pytest.importorskip`` unless ``JAXCIFAR_REQUIRE_TORCH=1`` (set by
``.ci/run``), where a missing package fails the test instead of skipping it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_ENV = "JAXCIFAR_REQUIRE_TORCH"


def require(module: str) -> ModuleType:
    """Returns the imported ``module``; skips the caller without it, or fails when JAXCIFAR_REQUIRE_TORCH=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is not importable ({e}) and {REQUIRE_ENV}=1", pytrace=False)
    return pytest.importorskip(module)
