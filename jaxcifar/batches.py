"""Device-resident data and the fixed-shape batches cut from it.

A split lives on the device(s) as uint8 (``DeviceSplit``); an epoch is an int32 (steps, batch) array
of indices into it (``shuffled_index_rows`` for training, drops the remainder; ``eval_index_rows``
for evaluation, pads with -1), and ``take_batch`` gathers one row on the device: no host round trip,
no recompilation (every batch has the same shape).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxcifar.data import Split
from jaxcifar.mesh import batch_sharded

# {"image": uint8 (B, H, W, 3), "label": int32 (B,)[, "mask": bool (B,), "index": int32 (B,)]}
Batch = dict[str, jax.Array]


class DeviceSplit(NamedTuple):
    """A split on the device: uint8 images (N, 32, 32, 3), int32 labels (N,)."""

    images: jax.Array
    labels: jax.Array

    @classmethod
    def put(cls, split: Split, sharding: Any = None) -> DeviceSplit:
        """Returns ``split`` copied to the device(s): the default device, or ``sharding`` (e.g. replicated)."""
        return cls(jax.device_put(split.images, sharding), jax.device_put(split.labels, sharding))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def shuffled_index_rows(key: jax.Array, n: int, steps_per_epoch: int, batch_size: int) -> jax.Array:
    """Returns int32 (steps_per_epoch, batch_size): a permutation of 0..n-1 without the remainder."""
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    return perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)


def eval_index_rows(n: int, batch_size: int) -> jax.Array:
    """Returns int32 (ceil(n / batch_size), batch_size): indices 0..n-1 padded with -1 (masked)."""
    rows = np.arange(math.ceil(n / batch_size) * batch_size, dtype=np.int32)
    rows[rows >= n] = -1
    return jax.device_put(rows.reshape(-1, batch_size))


def take_batch(images: jax.Array, labels: jax.Array, index_rows: jax.Array, row: jax.Array) -> Batch:
    """Returns batch ``row`` of a device-resident split: ``index_rows`` is int32 (steps, B).

    Negative indices mark padding: they fetch image 0 and get ``mask`` False. Returns
    ``{"image": uint8 (B, H, W, 3), "label": int32 (B,), "mask": bool (B,), "index": int32 (B,)}`` (``index``:
    each image's position in the split, 0 for padding).
    """
    idx = jax.lax.dynamic_index_in_dim(index_rows, row, keepdims=False)
    safe = jnp.maximum(idx, 0)
    return {"image": images[safe], "label": labels[safe], "mask": idx >= 0, "index": safe}


gather_batch = jax.jit(take_batch)  # ``take_batch`` jitted, output on the default device.


def make_gather_batch(mesh: Mesh | None) -> Callable[[jax.Array, jax.Array, jax.Array, int], Batch]:
    """Returns ``take_batch`` jitted so that its batch is sharded over ``mesh``'s ``data`` axis (each
    device gathers its own slice from its replica of the split), or ``gather_batch`` without a mesh."""
    if mesh is None:
        return gather_batch
    return jax.jit(take_batch, out_shardings=batch_sharded(mesh))
