"""Optional PyTorch dependencies of the tests: skipped without them, required in CI.

``require("torch")`` is ``pytest.importorskip`` unless ``JAXCIFAR_REQUIRE_TORCH=1`` (set by
``.ci/run``), where a missing package fails the test instead of skipping it.

Every test that calls ``require`` carries the ``torch`` marker (``pytestmark`` for a module-level call), so CI can
run those tests on the Python that has PyTorch (``-m torch``) and the rest on another; ``require`` fails an
unmarked caller, whether PyTorch is installed or not.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest

REQUIRE_ENV = "JAXCIFAR_REQUIRE_TORCH"

# The test item running now (set and cleared by tests/conftest.py around each test's set-up, call and teardown).
running: list[pytest.Item] = []


def require(module: str) -> ModuleType:
    """Returns the imported ``module``; skips the caller without it, or fails when JAXCIFAR_REQUIRE_TORCH=1."""
    _check_marked(sys._getframe(1).f_globals)
    if os.environ.get(REQUIRE_ENV) == "1":
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is not importable ({e}) and {REQUIRE_ENV}=1", pytrace=False)
    return pytest.importorskip(module)


def _check_marked(caller_globals: dict) -> None:
    """Fails unless the running test (or, at import, the calling module's ``pytestmark``) is marked ``torch``."""
    if running:
        marked = running[-1].get_closest_marker("torch") is not None
        where = running[-1].nodeid
    else:
        marks = caller_globals.get("pytestmark", [])
        marks = marks if isinstance(marks, list) else [marks]
        marked = any(getattr(m, "name", None) == "torch" for m in marks)
        where = caller_globals.get("__name__", "?")
    if not marked:
        pytest.fail(f"{where} needs PyTorch: mark it @pytest.mark.torch (pytestmark at module level)", pytrace=False)
