"""Downloading the official cifar python tarball into the cache, md5-verified."""

from __future__ import annotations

import hashlib
import logging
import urllib.request
from pathlib import Path

from jaxcifar.errors import DataError
from jaxcifar.sources.common import CIFAR_PYTHON, default_cache_dir

log = logging.getLogger(__name__)


def md5sum(path: Path) -> str:
    """Returns the hex md5 of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar_python(dataset: str, cache_dir: Path | None = None) -> Path:
    """Downloads the official tarball into the cache (once), verifies its md5, returns its path."""
    spec = CIFAR_PYTHON[dataset]
    cache_dir = cache_dir or default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "is a file, not a folder" if cache_dir.is_file() else f"cannot be created ({e.strerror or e})"
        raise DataError(
            f"cache folder {cache_dir} {what}: set JAXCIFAR_CACHE_DIR to a folder (or unset it for ~/.cache/jaxcifar)"
        ) from e
    target = cache_dir / spec["url"].rsplit("/", 1)[1]
    if not target.exists():
        partial = target.with_suffix(".part")
        log.info("downloading %s to %s", spec["url"], target)
        try:
            urllib.request.urlretrieve(spec["url"], partial)
        except OSError as e:
            raise DataError(f"cannot download {spec['url']} ({e}); pass the tarball with --data-dir") from e
        partial.rename(target)
    verify_md5(target, spec["md5"])
    return target


def verify_md5(path: Path, expected: str) -> None:
    """Raises DataError unless the file's md5 is ``expected``."""
    actual = md5sum(path)
    if actual != expected:
        raise DataError(
            f"{path}: md5 {actual} does not match the published {expected} (a truncated or corrupt download); "
            "delete it and retry"
        )
