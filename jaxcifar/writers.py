"""Metric outputs of a run: ``history.json`` and TensorBoard event files (tensorboardX, no TensorFlow).

TensorBoard events are written synchronously with tensorboardX's ``EventsWriter`` (the record writer
under its ``SummaryWriter``). ``SummaryWriter`` writes from a background thread that dies on a write
error (full disk) with a traceback and then blocks its callers forever once its queue is full; here a
failed write raises ``RunFileError`` in the training loop, which ends the run with one line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxcifar.errors import RunFileError
from jaxcifar.files import write_json
from jaxcifar.layout import RunDir


class TensorBoardWriter:
    """Appends scalar and image events to one event file in ``logdir``; errors raise RunFileError."""

    def __init__(self, logdir: str | Path):
        # tensorboardX imports torch when it is installed: imported here, not with jaxcifar (whose core
        # never imports torch).
        from tensorboardX.event_file_writer import EventsWriter

        self.logdir = Path(logdir)
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._events = EventsWriter(str(self.logdir / "events"))
        except OSError as e:
            raise RunFileError(f"cannot write TensorBoard events in {self.logdir}: {e.strerror or e}") from None

    def _write(self, summ: Any, step: int) -> None:
        from tensorboardX.proto import event_pb2

        try:
            self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summ))
        except OSError as e:
            raise RunFileError(f"cannot write TensorBoard events in {self.logdir}: {e.strerror or e}") from None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Logs a scalar at ``step``."""
        from tensorboardX import summary

        self._write(summary.scalar(tag, float(value)), step)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Logs a uint8 (H, W, 3) image at ``step``."""
        from tensorboardX import summary

        self._write(summary.image(tag, image, dataformats="HWC"), step)

    def flush(self) -> None:
        """Writes buffered events to disk."""
        try:
            self._events.flush()
        except OSError as e:
            raise RunFileError(f"cannot write TensorBoard events in {self.logdir}: {e.strerror or e}") from None

    def close(self) -> None:
        """Flushes and closes the event file (errors on close are ignored: the run's state is saved)."""
        try:
            self._events.close()
        except OSError:
            pass


class MetricWriter:
    """Writes each finished epoch to ``history.json`` and TensorBoard scalars under ``tensorboard/``."""

    def __init__(self, workdir: str | Path, history: list[dict[str, Any]] | None = None, enabled: bool = True):
        """``enabled=False`` (hosts other than the first) keeps the history in memory, writes nothing."""
        self.workdir = Path(workdir)
        self.history: list[dict[str, Any]] = list(history or [])
        self.enabled = enabled
        self.tb = TensorBoardWriter(RunDir(self.workdir).tensorboard) if enabled else None

    def write_history(self) -> None:
        """Writes ``history.json`` (atomically) as the history stands."""
        if self.enabled:
            write_json(RunDir(self.workdir).history_json, self.history)

    def write_epoch(self, record: dict[str, Any], history: bool = True) -> None:
        """Appends one epoch's record (keys like train_loss, test_acc, lr, seconds) and logs its scalars
        to TensorBoard; with ``history`` also rewrites ``history.json`` (a caller whose checkpoint of the
        epoch is still being written calls ``write_history`` once it is committed)."""
        self.history.append(record)
        if self.tb is None:
            return
        if history:
            self.write_history()
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key == "epoch" or not isinstance(value, int | float):
                continue
            self.tb.add_scalar(tensorboard_tag(key), value, epoch)
        self.tb.flush()

    def write_scalar(self, tag: str, value: float, step: int) -> None:
        """Logs one scalar at an optimizer step (e.g. the running train loss)."""
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self.tb is not None:
            self.tb.close()


def tensorboard_tag(key: str) -> str:
    """Returns the TensorBoard tag of a history key: ``test_acc`` -> ``acc/test``, ``ema_test_loss`` ->
    ``loss/ema_test``; other keys (``lr``, ``seconds``) stay as they are."""
    for metric in ("loss", "acc"):
        if key.endswith(f"_{metric}"):
            return f"{metric}/{key[: -len(metric) - 1]}"
    return key
