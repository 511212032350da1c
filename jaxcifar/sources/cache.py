"""The decoded-image cache: an image folder's decoded arrays stored under ``folder_cache_root()``, one entry
per folder state, written atomically and checked (CRC-32) when read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxcifar.sources.common import IMAGE_SIZE, Arrays, default_cache_dir, first_line

try:
    import fcntl
except ImportError:  # Windows: no flock; abandoned temporary cache folders go by age only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Bump when the stored layout or the decoding changes: older entries are then ignored (and deleted). 2: 16-bit
# grayscale PNGs keep their high byte (format 1 stored them clipped to white).
FOLDER_CACHE_FORMAT = 2
_STALE_TEMP_SECONDS = 3600  # a hidden temporary entry older than this was left by a killed run


def folder_cache_root() -> Path:
    """Returns the folder that holds decoded image-folder caches: ``default_cache_dir() / "folders"``."""
    return default_cache_dir() / "folders"


def folder_cache_entry(root: Path, listing: dict[str, tuple[list[Path], np.ndarray]], resize: bool) -> Path | None:
    """Returns the cache entry folder for a listed image folder, or None when a listed file cannot be stat'ed.

    Named ``<where>-<what>``: ``where`` hashes the folder's absolute path and ``resize``; ``what`` hashes
    those plus the cache format, the Pillow version and, per file in listing order, its split/class/name,
    size, mtime and ctime (ns), so a changed, added, removed, renamed or touched file (or one replaced by a
    copy that kept size and mtime: its ctime changes) names another entry.
    """
    from PIL import __version__ as pillow_version

    absolute = str(root.resolve())
    where = hashlib.sha256(f"{absolute}\0resize={resize}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
    what = hashlib.sha256(
        f"jaxcifar folder cache {FOLDER_CACHE_FORMAT}\0{absolute}\0resize={resize}\0Pillow {pillow_version}\0".encode(
            "utf-8", "surrogateescape"
        )
    )
    try:
        for split, (files, _) in listing.items():
            lines = []
            for path in files:
                st = os.stat(path)
                lines.append(
                    f"{split}/{path.parent.name}/{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n"
                )
            what.update("".join(lines).encode("utf-8", "surrogateescape"))
    except OSError:
        return None
    return folder_cache_root() / f"{where}-{what.hexdigest()[:16]}"


def load_folder_cache(
    entry: Path, listing: dict[str, tuple[list[Path], np.ndarray]], class_names: list[str]
) -> dict[str, np.ndarray] | None:
    """Returns ``{split: images uint8 (N, 32, 32, 3)}`` from a cache entry, or None when there is none.

    The images are copy-on-write memory maps of the entry's .npy files (writable, changes stay in this
    process). A damaged entry (unreadable or truncated file, wrong shape, labels or class names that do not
    match the listing, a CRC-32 that does not match) logs one warning, is deleted, and gives None.
    """
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta["format"] != FOLDER_CACHE_FORMAT or meta["class_names"] != class_names:
            raise ValueError("its format or class names differ")
        out = {}
        for split, (files, labels) in listing.items():
            images = np.load(entry / f"{split}_images.npy", mmap_mode="c", allow_pickle=False)
            stored = np.load(entry / f"{split}_labels.npy", allow_pickle=False)
            if images.dtype != np.uint8 or images.shape != (len(files), IMAGE_SIZE, IMAGE_SIZE, 3):
                raise ValueError(f"{split} images are {images.dtype} {images.shape}, the folder has {len(files)}")
            if stored.dtype != np.int32 or not np.array_equal(stored, labels):
                raise ValueError(f"{split} labels differ from the folder's")
            if zlib.crc32(images) != meta["crc32"][split]:
                raise ValueError(f"{split} images do not match their CRC-32")
            out[split] = np.asarray(images)  # a plain ndarray view of the map
        return out
    except Exception as e:  # a damaged cache must never fail a run: it is decoded again
        log.warning("ignoring damaged folder cache %s (%s); decoding the images again", entry, first_line(e))
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Writes ``array`` as a .npy file (no fsync: the entry's CRC-32 catches what a power cut damages)."""
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def write_folder_cache(
    entry: Path, arrays: dict[str, Arrays], class_names: list[str], root: Path, resize: bool
) -> bool:
    """Stores decoded arrays as the cache ``entry``; returns True when the entry exists afterwards.

    Atomic: the files go to a hidden temporary folder beside the entry, which is then renamed, so a killed
    run leaves no entry that loads. The writer holds a lock on that folder (``lock_folder``): a killed or
    interrupted writer's folder is deleted at the next load (``remove_abandoned``), a live one's never. Then
    the entries no load can use are deleted (``_remove_stale``). A read-only, full or unusable cache folder
    logs one warning line and returns False (the run goes on without the cache).
    """
    meta: dict[str, Any] = {
        "format": FOLDER_CACHE_FORMAT,
        "root": str(root.resolve()),
        "resize": resize,
        "class_names": class_names,
        "count": {},
        "crc32": {},
    }
    try:
        with staged_folder(entry) as tmp:
            for split, (images, labels) in arrays.items():
                _save_npy(tmp / f"{split}_images.npy", images)
                _save_npy(tmp / f"{split}_labels.npy", labels)
                meta["count"][split] = len(labels)
                meta["crc32"][split] = zlib.crc32(np.ascontiguousarray(images))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        log.warning(
            "cannot write the folder cache in %s (%s); loading without it (JAXCIFAR_CACHE_DIR sets the cache folder)",
            entry.parent,
            e.strerror or e,
        )
        return False
    _remove_stale(entry)
    return True


@contextlib.contextmanager
def staged_folder(entry: Path) -> Iterator[Path]:
    """Yields a new hidden folder beside ``entry`` (made here, locked with ``lock_folder``) to write ``entry``'s
    files into; when the block ends normally, renames it to ``entry``, readable as the folders ``mkdir`` makes
    (when another process renamed its copy to ``entry`` first, that one stays). However the block ends, the
    folder is gone afterwards and its lock released, so no half-written ``entry`` is ever read; a killed
    process's folder is deleted by the next ``remove_abandoned``. OSError from making or renaming it
    propagates."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))
    lock: int | None = None
    try:
        lock = lock_folder(tmp)
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after the rename
        if lock is not None:
            os.close(lock)


def lock_folder(folder: Path) -> int | None:
    """Takes an exclusive ``flock`` on a new temporary cache folder; returns the descriptor that holds it
    (the lock lasts until it is closed or this process ends, however it ends), or None where folders cannot
    be locked (Windows, some network file systems: their abandoned folders go by age, ``_remove_stale``).

    Taken before anything is written into the folder: a folder with files and no lock holder was abandoned.
    Blocking: ``remove_abandoned`` holds the lock of an empty folder only for a look at its contents.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_abandoned(cache: Path) -> None:
    """Deletes the hidden temporary folders (``.*.tmp``) in ``cache`` whose writer has ended: killed or
    interrupted mid-write (``os._exit`` on Ctrl-C), it left files in its folder and no lock on it (see
    ``lock_folder``). A folder whose writer still runs (locked), an empty one (its writer may be about to
    lock it) and one that cannot be locked are left alone; ``_remove_stale`` deletes those an hour old."""
    if fcntl is None:
        return
    try:
        names = [n for n in os.listdir(cache) if n.startswith(".") and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        folder = cache / name
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while the writer holds it
            if os.listdir(folder):
                log.info("folder cache: deleting %s, left by an interrupted write", folder)
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def _remove_stale(entry: Path) -> None:
    """Deletes the cache entries that no load can use any more: the other entries of ``entry``'s folder and
    resize flag (older states of the folder), entries whose folder no longer exists (e.g. a deleted
    temporary copy), and temporary entries of killed runs an hour old (those ``remove_abandoned`` cannot
    tell: no lock)."""
    where = entry.name.split("-")[0]
    with contextlib.suppress(OSError):
        for other in entry.parent.iterdir():
            if other.name == entry.name:
                continue
            if other.name.startswith("."):
                with contextlib.suppress(OSError):
                    if other.name.endswith(".tmp") and time.time() - other.stat().st_mtime > _STALE_TEMP_SECONDS:
                        shutil.rmtree(other, ignore_errors=True)
            elif other.name.startswith(f"{where}-") or not _cached_folder_exists(other):
                shutil.rmtree(other, ignore_errors=True)


def _cached_folder_exists(entry: Path) -> bool:
    """False when the entry's meta.json names a folder that is gone; True when it exists or is unknown."""
    try:
        return Path(json.loads((entry / "meta.json").read_text())["root"]).is_dir()
    except (OSError, ValueError, KeyError, TypeError):
        return True  # unreadable: left alone (it is replaced when its folder is next loaded)
