"""Shared fixtures. Compiles dominate test time on CPU: small widths, session-scoped runs (their fields, and the
tiny runs that tests start as commands, are in ``tests/tiny_runs.py``)."""

from __future__ import annotations

import atexit
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import jax
import pytest

from tests import torch_support
from tests.archive import first_per_class
from tests.tiny_runs import SYNTHETIC_RUN

# Unit tests compare numbers, not speed: skip XLA's expensive optimization passes.
jax.config.update("jax_disable_most_optimizations", True)
# One persistent compilation cache per session: runs of the same shapes (the session fixtures and the
# tests that resume or break them) compile once, whichever jitted function object asks.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="jaxcifar-tests-xla-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, True)
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Caches the code keeps (decoded image folders, XLA) go to a folder of this session, never the user's ~/.cache.
_CACHE_HOME = tempfile.mkdtemp(prefix="jaxcifar-tests-cache-")
atexit.register(shutil.rmtree, _CACHE_HOME, True)
os.environ["JAXCIFAR_CACHE_DIR"] = _CACHE_HOME

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(
    os.environ.get("JAXCIFAR_SHARED_ARCHIVE", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Tells ``torch_support.require`` which test is running (set-up, call and teardown)."""
    torch_support.running.append(item)
    try:
        yield
    finally:
        torch_support.running.remove(item)


# The tests use at most a few hundred real images per split; unpacking the first files of every
# class folder instead of all 60,000 saves most of the fixture's time.
PER_CLASS = {"train": 150, "test": 60}


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 JPEGs from the shared archive, unpacked once per session: the first 150 train and
    60 test images of every class, in the archive's own train/<class>/, test/<class>/ tree.

    Skips when the archive is absent, unless JAXCIFAR_REQUIRE_SHARED_DATA=1 (CI), where it fails.
    """
    if not SHARED_ARCHIVE.is_file():
        message = f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE}"
        if os.environ.get("JAXCIFAR_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + " and JAXCIFAR_REQUIRE_SHARED_DATA=1")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(SHARED_ARCHIVE) as tar:
        tar.extractall(root, members=first_per_class(tar, PER_CLASS), filter="data")
    found = [p for p in root.rglob("train") if p.is_dir()]
    assert found, f"{SHARED_ARCHIVE} holds no train/ folder"
    return found[0].parent


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished 4-epoch ResNet18 (width 8) run on the synthetic problem: (config, FitResult)."""
    from jaxcifar import Config, fit

    config = Config(workdir=str(tmp_path_factory.mktemp("synthetic-run") / "run"), **SYNTHETIC_RUN)
    return config, fit(config, verbose=False)


@pytest.fixture(scope="session")
def real_run(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One epoch of ResNet18 (width 8) on 400 real shared images, with ``--report``: (config, RunResult)."""
    from jaxcifar import Config, run

    config = Config(
        data_source="folder",
        data_dir=str(shared_data_dir),
        train_subset=400,
        test_subset=200,
        width=8,
        epochs=1,
        batch_size=50,
        lr=0.05,
        report=True,
        workdir=str(tmp_path_factory.mktemp("real-run") / "run"),
    )
    return config, run(config, verbose=False)


@pytest.fixture(scope="session")
def chaos_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for `python -m jaxcifar.train` child processes of the chaos and lock tests: unbuffered
    output, XLA's quick compile mode (as this process), and one persistent compilation cache for the
    session, so that only the first child compiles the tiny run."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
