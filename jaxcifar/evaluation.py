"""Evaluation over a whole split: ``Evaluator`` (compiled once, used every epoch) and ``evaluate``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxcifar import steps
from jaxcifar.batches import DeviceSplit, eval_index_rows, make_gather_batch
from jaxcifar.data import Dataset, Split
from jaxcifar.errors import DataError
from jaxcifar.state import TrainState


class Evaluator:
    """Loss and accuracy of a state over one device-resident split, in fixed-size batches (the last
    one padded and masked), with one jitted eval step: ``evaluator(state) -> {"loss", "acc"}``.

    ``tta`` averages the softmax over test-time views, ``ema`` evaluates the EMA weights; with a
    ``mesh`` the batches are sharded over its ``data`` axis and the split must be replicated on it.
    """

    def __init__(
        self,
        split: DeviceSplit,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        *,
        tta: str = "none",
        ema: bool = False,
        mesh: Mesh | None = None,
    ) -> None:
        self.split = split
        self.tta = tta
        self.rows = eval_index_rows(len(split), batch_size)
        self.gather = make_gather_batch(mesh)
        self.step: Any = steps.make_eval_step(mean, std, mesh=mesh, tta=tta, ema=ema)

    def batch(self, i: int) -> steps.Batch:
        """Returns batch ``i`` of the split (``{"image", "label", "mask"}``, fixed shape)."""
        return self.gather(self.split.images, self.split.labels, self.rows, i)

    def compile(self, state: TrainState) -> None:
        """Compiles the eval step for ``state`` ahead of time (else the first call compiles it)."""
        self.step = self.step.lower(state, self.batch(0)).compile()

    def __call__(self, state: TrainState) -> dict[str, float]:
        """Returns ``{"loss", "acc"}`` (Python floats) of ``state`` over the whole split; with TTA also
        ``{"plain_loss", "plain_acc"}``, those of the unaltered images (the TTA's first view)."""
        totals = None
        for i in range(self.rows.shape[0]):
            metrics = self.step(state, self.batch(i))
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
        totals = jax.device_get(totals)
        result = {
            "loss": float(totals["loss_sum"] / totals["count"]),
            "acc": float(totals["correct"] / totals["count"]),
        }
        if "plain_correct" in totals:
            result["plain_loss"] = float(totals["plain_loss_sum"] / totals["count"])
            result["plain_acc"] = float(totals["plain_correct"] / totals["count"])
        return result


def evaluate(
    state: TrainState,
    dataset: Dataset,
    split: str = "test",
    *,
    batch_size: int = 1000,
    tta: str = "none",
    ema: bool = False,
) -> dict[str, float]:
    """Returns ``{"loss", "acc"}`` of ``state`` (its EMA weights with ``ema``) over ``dataset``'s ``split``
    (``"test"``, ``"val"`` or ``"train"``), normalized with the dataset's mean/std, on the default device;
    with a ``tta`` other than ``none`` also ``{"plain_loss", "plain_acc"}`` (the unaltered images alone)."""
    data: Split | None = getattr(dataset, split, None) if split in ("train", "val", "test") else None
    if data is None:
        raise DataError(f"the dataset has no {split!r} split (train, test, and val with --val-fraction > 0)")
    return Evaluator(DeviceSplit.put(data), dataset.mean, dataset.std, batch_size, tta=tta, ema=ema)(state)
