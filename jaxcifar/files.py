"""Run files written atomically: JSON (strict, no NaN), text, and matplotlib figures.

Every file the project writes goes through ``atomic_write``: the bytes go to a temporary file in the
same folder, are flushed to disk, and replace the target with ``os.replace``. A crash, Ctrl-C or full
disk leaves either the old file or the new one, never half a file. Failures raise ``RunFileError``
naming the path and the OS error.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from jaxcifar.errors import RunFileError


def atomic_write(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file + rename; raises RunFileError on OS errors."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; run files are for reading by anyone, as open() makes
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise RunFileError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def finite_or_none(data: Any) -> Any:
    """Returns ``data`` with every non-finite float (nan, inf) replaced by None (strict JSON has none)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_or_none(v) for v in data]
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Writes ``data`` as strict JSON (non-finite floats become null), atomically."""
    text = json.dumps(finite_or_none(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, text.encode())


def read_json(path: str | Path) -> Any:
    """Returns the parsed JSON file; raises RunFileError naming the file when it is unreadable or garbage."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise RunFileError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path} is not valid JSON ({e}); was it truncated or edited?") from None


def read_history(workdir: str | Path) -> list[dict[str, Any]]:
    """Returns the per-epoch records of ``workdir/history.json`` ([] when there is none).

    Raises RunFileError naming the file when it is not a JSON list of records.
    """
    path = Path(workdir) / "history.json"
    if not path.exists():
        return []
    history = read_json(path)
    if not isinstance(history, list) or not all(isinstance(r, dict) and "epoch" in r for r in history):
        raise RunFileError(f"{path} is not a list of epoch records; was it edited?")
    return history


def save_figure(figure: Any, path: str | Path, dpi: int = 100) -> None:
    """Saves a matplotlib Figure as PNG at ``path``, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, buffer.getvalue())


def ensure_dir(path: str | Path, flag: str) -> Path:
    """Creates the folder ``path`` (and parents) and returns it; RunFileError when it is a file or unwritable.

    ``flag`` names the option the path came from, for the message (e.g. ``--workdir``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFileError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFileError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None
    return path
