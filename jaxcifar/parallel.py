"""Data parallelism: one ``Mesh`` with a ``data`` axis over the devices, and its shardings.

The batch is sharded along ``data``; parameters, batch statistics and optimizer state are
replicated; the step is one ``jax.jit`` with these shardings (no ``pmap``). BatchNorm means and
variances are reductions over the batch axis, so XLA computes them over the global batch (with an
all-reduce): 1 device and N devices give the same result for the same global batch.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcifar.errors import ConfigError

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """Returns a 1-D mesh over the first ``num_devices`` devices (0 = all, across all hosts)."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ConfigError(f"--num-devices {num_devices}: only {len(devices)} {devices[0].platform} device(s) present")
    chosen = devices[: num_devices or len(devices)]
    return Mesh(chosen, (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of ``mesh`` (state, datasets, indices)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the ``data`` axis of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, flag: str) -> None:
    """Raises ConfigError unless ``batch_size`` splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(
            f"{flag} {batch_size} is not divisible by the {n} devices; use a multiple of {n} "
            f"(e.g. {max(n, batch_size // n * n)}) or --num-devices"
        )


def describe(mesh: Mesh) -> str:
    """Returns e.g. ``devices: 8 x cpu`` (plus the host count when there are several processes)."""
    devices = mesh.devices.flatten()
    text = f"devices: {len(devices)} x {devices[0].platform}"
    if jax.process_count() > 1:
        text += f" on {jax.process_count()} hosts (this is host {jax.process_index()})"
    return text


def initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` (multi-host: TPU pods, Slurm, Open MPI, or the
    ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` environment)."""
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = {
            "coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
            "num_processes": int(os.environ.get("JAX_NUM_PROCESSES", "1")),
            "process_id": int(os.environ.get("JAX_PROCESS_ID", "0")),
        }
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
