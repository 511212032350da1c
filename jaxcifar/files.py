"""Run files written atomically: JSON (strict, no NaN), text, and matplotlib figures.

Every file the project writes goes through ``atomic_write``: the bytes go to a temporary file in the
same folder, are flushed to disk, and replace the target with ``os.replace``. A crash, Ctrl-C or full
disk leaves either the old file or the new one, never half a file. Failures raise ``RunFileError``
naming the path and the OS error.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from jaxcifar.console import printable
from jaxcifar.errors import ConfigError, RunFileError

NAME_MAX = 255  # bytes in one file or folder name where the file system does not say (Linux, macOS)
PATH_MAX = 4096  # bytes in a whole path where the file system does not say


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


def save_figure(figure: Any, path: str | Path, dpi: int = 100) -> None:
    """Saves a matplotlib Figure as PNG at ``path``, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, buffer.getvalue())


def ensure_dir(path: str | Path, flag: str) -> Path:
    """Creates the folder ``path`` (and parents) and returns it; RunFileError when it is a file or unwritable,
    ConfigError when its name is too long (``check_name``; a name that is not UTF-8 is fine for these files).

    ``flag`` names the option the path came from, for the message (e.g. ``--workdir``)."""
    path = check_name(path, flag, utf8=False)
    if path.exists() and not path.is_dir():
        raise RunFileError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFileError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None
    return path


def check_name(path: str | Path, flag: str, utf8: bool = True) -> Path:
    """Returns ``path`` as a Path when the file system (and, with ``utf8``, orbax) can use it as a name.

    Raises ConfigError (one line, naming ``flag``) before anything is read or written: for a file or folder name
    longer than the file system allows (ENAMETOOLONG: 255 bytes on most), a path longer than it allows, and with
    ``utf8`` for a name that is not UTF-8 text (orbax writes checkpoints only under UTF-8 paths; Python carries
    such a name's bytes as surrogate escapes, shown here as ``\\xff``)."""
    text = os.fspath(path)
    if utf8:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"{flag} {printable(text)}: the name is not valid UTF-8 text, which the paths of run files need "
                "(orbax writes checkpoints only under UTF-8 paths); choose a UTF-8 name (e.g. rename the folder)"
            ) from None
    name_max, path_max = _limits(Path(text))
    for part in Path(text).parts:
        size = len(os.fsencode(part))
        if size > name_max:
            short = printable(part[:24]) + "..."
            raise ConfigError(
                f"{flag}: the name {short} is {size} bytes long; this file system allows at most {name_max} bytes in "
                "a file or folder name"
            )
    full = len(os.fsencode(os.path.abspath(text)))
    if full >= path_max:
        raise ConfigError(
            f"{flag}: the path is {full} bytes long (absolute); this file system allows paths of fewer than "
            f"{path_max} bytes"
        )
    try:
        os.stat(text)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"{flag} {printable(text)[:80]}...: {e.strerror}") from None
    return Path(text)


def _limits(path: Path) -> tuple[int, int]:
    """Returns (NAME_MAX, PATH_MAX) of the file system holding the nearest existing folder of ``path``."""
    folder = Path(os.path.abspath(path))
    while True:
        try:
            if folder.is_dir():
                break
        except OSError:
            pass
        if folder.parent == folder:
            break
        folder = folder.parent
    limits = []
    for name, default in (("PC_NAME_MAX", NAME_MAX), ("PC_PATH_MAX", PATH_MAX)):
        try:
            limits.append(int(os.pathconf(folder, name)) or default)
        except (OSError, ValueError):
            limits.append(default)
    return limits[0], limits[1]
