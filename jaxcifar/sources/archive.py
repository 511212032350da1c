"""Tar archives of an image-folder tree (e.g. ``cifar10-jpeg.tar.gz``) given as ``--data-dir``: recognized by
their first members and unpacked once into the cache (``unpacked_root()``), beside the decoded-image cache."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import zlib
from pathlib import Path

from jaxcifar.errors import DataError
from jaxcifar.sources.cache import remove_abandoned, staged_folder
from jaxcifar.sources.common import CIFAR_PYTHON, IMAGE_EXTENSIONS, SPLITS, default_cache_dir, first_line

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_PEEK_MEMBERS = 1000  # members looked at to recognize an image-folder archive (a README or two may come first)
_MAX_IMAGE_BYTES = 1 << 20  # a larger file is no 32x32 image: the peek stops there (no decompressing past it)
_RELEASE_FILES = {name for spec in CIFAR_PYTHON.values() for name in (*spec["train"], *spec["test"], spec["meta"][0])}
# What a damaged archive raises while it is read: bad headers, truncated or corrupt compressed data.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def unpacked_root() -> Path:
    """Returns the folder that holds unpacked image-folder archives: ``default_cache_dir() / "unpacked"``."""
    return default_cache_dir() / "unpacked"


def _parts(name: str) -> list[str]:
    """The folder and file names of the member ``name`` (``a//./b`` gives ``["a", "b"]``)."""
    return [p for p in name.split("/") if p not in ("", ".")]


def _image_member(name: str) -> str | None:
    """Returns the folder that holds ``train/`` and ``test/`` ("" for the archive's top) when the member
    ``name`` is an image at ``[FOLDER/]SPLIT/CLASS/FILE``, else None. Absolute names, ``..``, backslashes (a
    folder separator on Windows) and hidden files or folders are never images here (nothing of them is
    unpacked). String operations, not pathlib: this runs once per member (60,000 for CIFAR-10)."""
    parts = _parts(name)
    if name.startswith("/") or len(parts) < 3 or any(p == ".." or p.startswith(".") or "\\" in p for p in parts):
        return None
    if parts[-3] not in SPLITS or os.path.splitext(parts[-1])[1].lower() not in IMAGE_EXTENSIONS:
        return None
    return "/".join(parts[:-3])


def image_folder_in_archive(path: Path) -> str | None:
    """Returns the folder of the tar archive ``path`` that holds ``train/`` and ``test/`` ("" for its top), or
    None when ``path`` is not such an archive: another name than .tar/.tar.gz/.tgz, unreadable, or its
    first regular file that decides (an image in ``SPLIT/CLASS/``, a cifar python file, a file over 1 MiB)
    is not an image. Reads only the archive's first members."""
    if not path.name.lower().endswith(ARCHIVE_SUFFIXES) or not path.is_file():
        return None
    try:
        with tarfile.open(path, "r:*") as tar:
            for index, member in enumerate(tar):
                if index >= _PEEK_MEMBERS:
                    return None
                if not member.isfile():
                    continue
                folder = _image_member(member.name)
                if folder is not None:
                    return folder
                if member.size > _MAX_IMAGE_BYTES or member.name.rsplit("/", 1)[-1] in _RELEASE_FILES:
                    return None
    except _READ_ERRORS:
        return None
    return None


def is_image_folder_archive(path: Path) -> bool:
    """True when ``path`` is a tar archive (.tar, .tar.gz, .tgz) of an image-folder tree."""
    return image_folder_in_archive(path) is not None


def unpack_image_folder_archive(path: Path) -> Path:
    """Unpacks the image-folder tree of the archive ``path`` into ``unpacked_root()`` once per state of the
    archive; returns the unpacked folder, which holds ``train/`` and ``test/``.

    The entry is named ``<where>-<what>``: ``where`` hashes the archive's absolute path, ``what`` that and its
    size and mtime, so a replaced archive is unpacked again (and the older copy deleted). Only the images at
    ``[FOLDER/]SPLIT/CLASS/FILE`` are unpacked, as regular files at ``SPLIT/CLASS/FILE`` (``_extract_images``:
    no links, no absolute, ``..`` or hidden names), into a hidden locked temporary folder that is renamed when
    complete: an interrupted unpack never leaves a copy that is read, and the next one deletes its
    leftovers. Logs one warning line while it unpacks. Raises DataError (one line, with the ``tar`` command
    that does it by hand) when the archive is damaged or the cache folder cannot hold the copy.
    """
    folder = image_folder_in_archive(path)
    if folder is None:
        raise DataError(f"{path}: not a tar archive of train/CLASS/*.jpg and test/CLASS/*.jpg")
    absolute = path.resolve()
    stat = absolute.stat()
    where = hashlib.sha256(str(absolute).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    what = hashlib.sha256(f"{where}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    entry = unpacked_root() / f"{where}-{what}"
    if not entry.is_dir():
        _unpack(absolute, folder, entry)
        _remove_older_copies(entry)
    return entry


def _by_hand(path: Path, folder: str) -> str:
    """The shell command that unpacks ``path`` by hand, and the ``--data-dir`` to pass then."""
    target = f"data/{path.name.split('.')[0] or 'images'}"
    inner = f"{target}/{folder}" if folder else target
    return f"unpack it by hand: mkdir -p {target} && tar -xf {path} -C {target}, then pass --data-dir {inner}"


def _unpack(path: Path, folder: str, entry: Path) -> None:
    """Unpacks the images under ``folder`` of the archive ``path`` into ``entry`` atomically (temporary
    folder, then rename); a concurrent unpack of the same state that renamed first wins."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(entry.parent)
        with staged_folder(entry) as tmp:
            logging.getLogger(__name__).warning(
                "%s: an archive of an image-folder tree; unpacking it once into %s (later runs read that copy)",
                path,
                entry,
            )
            _extract_images(path, folder, tmp)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"{path}: truncated or corrupt archive ({first_line(e)}); copy it again, or {_by_hand(path, folder)}"
        ) from e
    except OSError as e:
        raise DataError(
            f"cannot unpack {path} into {entry.parent} ({e.strerror or first_line(e)}); set JAXCIFAR_CACHE_DIR to a "
            f"folder with room for it, or {_by_hand(path, folder)}"
        ) from e


def _extract_images(path: Path, folder: str, target: Path) -> None:
    """Writes the regular image files at ``folder/SPLIT/CLASS/FILE`` of the archive ``path`` to
    ``target/SPLIT/CLASS/FILE``; nothing else (links, devices, other names) leaves the archive.

    Safe by construction: every name passed ``_image_member`` (relative, no ``..``, nothing hidden), the
    folders are made here and the files opened without following links. Not ``TarFile.extractall``: with
    tarfile's ``data`` filter it took 1.6x as long (its ``realpath``, ``chmod`` and ``utime`` per file;
    experiments/data_loading/README.md).
    """
    made: set[str] = set()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile() or _image_member(member.name) != folder:
                continue
            split, label, name = _parts(member.name)[-3:]
            parent = os.path.join(target, split, label)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            with open(os.open(os.path.join(parent, name), flags, 0o644), "wb") as out:
                shutil.copyfileobj(tar.extractfile(member), out)


def _remove_older_copies(entry: Path) -> None:
    """Deletes the other unpacked copies of the same archive path (older states of the archive)."""
    where = entry.name.split("-")[0]
    with contextlib.suppress(OSError):
        for other in entry.parent.iterdir():
            if other.name != entry.name and other.name.startswith(f"{where}-"):
                shutil.rmtree(other, ignore_errors=True)
