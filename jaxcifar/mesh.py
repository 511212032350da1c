"""Data parallelism: one ``Mesh`` with a ``data`` axis over the devices, and its shardings.

The batch is sharded along ``data``; parameters, batch statistics and optimizer state are
replicated; the step is one ``jax.jit`` with these shardings (no ``pmap``). BatchNorm means and
variances are reductions over the batch axis, so XLA computes them over the global batch (with an
all-reduce): 1 device and N devices give the same result for the same global batch. In a multi-process
run (``jaxcifar.distributed``) the mesh spans the devices of every process.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcifar.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """Returns a 1-D mesh over the first ``num_devices`` devices (0 = all, across all hosts)."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ConfigError(f"--num-devices {num_devices}: only {len(devices)} {devices[0].platform} device(s) present")
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        raise ConfigError(
            f"--num-devices {num_devices}: a run of {jax.process_count()} processes uses all {len(devices)} devices "
            "(every process must hold part of the mesh); use --num-devices 0"
        )
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
    """Returns e.g. ``devices: 8 x cpu``, or ``devices: 8 x cpu (2 processes x 4; this is process 1)``."""
    devices = mesh.devices.flatten()
    text = f"devices: {len(devices)} x {devices[0].platform}"
    if jax.process_count() > 1:
        text += (
            f" ({jax.process_count()} processes x {jax.local_device_count()}; this is process {jax.process_index()})"
        )
    return text
