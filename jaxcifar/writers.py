"""Metric outputs of a run: ``history.json`` and TensorBoard event files (tensorboardX, no TensorFlow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxcifar.checkpoint import write_json


class MetricWriter:
    """Writes each finished epoch to ``history.json`` and TensorBoard scalars under ``tensorboard/``."""

    def __init__(self, workdir: str | Path, history: list[dict[str, Any]] | None = None, enabled: bool = True):
        """``enabled=False`` (hosts other than the first) keeps the history in memory, writes nothing."""
        from tensorboardX import SummaryWriter

        self.workdir = Path(workdir)
        self.history: list[dict[str, Any]] = list(history or [])
        self.enabled = enabled
        self.tb = SummaryWriter(str(self.workdir / "tensorboard")) if enabled else None

    def write_epoch(self, record: dict[str, Any]) -> None:
        """Appends one epoch's record (keys like train_loss, test_acc, lr, seconds) and flushes it."""
        self.history.append(record)
        if self.tb is None:
            return
        write_json(self.workdir / "history.json", self.history)
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key == "epoch" or not isinstance(value, (int, float)):
                continue
            group, _, name = key.partition("_")
            tag = f"{name}/{group}" if name in ("loss", "acc") else key
            self.tb.add_scalar(tag, value, epoch)
        self.tb.flush()

    def write_scalar(self, tag: str, value: float, step: int) -> None:
        """Logs one scalar at an optimizer step (e.g. the running train loss)."""
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self.tb is not None:
            self.tb.close()
