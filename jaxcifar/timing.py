"""Where a run's wall time goes: ``Timing`` adds up seconds per phase and writes ``timing.json``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from jaxcifar.files import write_json

# The phases of a run, in the order the summary line lists them; "other" is the rest of the total.
PHASES = ("startup", "lr_find", "init", "data", "compile", "train", "eval", "checkpoint", "report")


class Timing:
    """Seconds per phase of one run (``PHASES``), from ``started`` (a ``time.perf_counter()`` value,
    default: now; the command line passes its process start so that imports count as start-up)."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def add(self, phase: str, seconds: float) -> None:
        """Adds ``seconds`` to ``phase`` (one of ``PHASES``)."""
        if phase not in self.seconds:
            raise ValueError(f"unknown timing phase {phase!r}; one of {', '.join(PHASES)}")
        self.seconds[phase] += seconds

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        """Times the ``with`` block as ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def record(self) -> dict[str, float]:
        """Returns ``{phase: seconds, ..., "other": ..., "total": ...}`` (seconds rounded to 0.01) up to now."""
        total = time.perf_counter() - self.started
        record = {name: round(value, 2) for name, value in self.seconds.items()}
        record["other"] = round(max(0.0, total - sum(self.seconds.values())), 2)
        record["total"] = round(total, 2)
        return record

    def summary_line(self, record: dict[str, float] | None = None) -> str:
        """Returns ``"time: total 92.1s = startup 3.2 + data 20.1 + ... + other 2.1"`` (phases above 0)."""
        record = record or self.record()
        parts = [f"{name} {record[name]:.1f}" for name in (*PHASES, "other") if record[name] > 0]
        return f"time: total {record['total']:.1f}s = " + " + ".join(parts)

    def write(self, path: str | Path) -> dict[str, float]:
        """Writes the record to ``path`` as JSON (atomically) and returns it."""
        record = self.record()
        write_json(path, record)
        return record
