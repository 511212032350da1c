"""The official cifar python release (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``), read from its
tarball or its unpacked folder, with one-line errors for a truncated or corrupt copy."""

from __future__ import annotations

import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from jaxcifar.errors import DataError
from jaxcifar.sources.archive import is_image_folder_archive
from jaxcifar.sources.common import CIFAR_PYTHON, IMAGE_SIZE, SPLITS, Arrays, default_cache_dir, first_line
from jaxcifar.sources.diagnose import explain_data_dir, looks_like_cifar_python

# What a broken download raises while reading: truncated gzip (EOFError), bad gzip/tar headers
# (tarfile.ReadError, gzip.BadGzipFile is an OSError), corrupt deflate data (zlib.error).
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _corrupt(path: Path, member: str | None, error: BaseException, dataset: str) -> DataError:
    """The one-line error for a truncated or corrupt release: names the file, suggests deleting it."""
    where = f"{path} ({member})" if member else str(path)
    return DataError(f"{where}: truncated or corrupt cifar python release ({first_line(error)}); {_fix(path, dataset)}")


def _fix(path: Path, dataset: str) -> str:
    """What to do about a damaged release at ``path`` (a tarball or an unpacked folder)."""
    url = CIFAR_PYTHON[dataset]["url"]
    if path.is_dir():
        return f"delete the folder and unpack {url.rsplit('/', 1)[1]} again"
    return f"delete it and download it again ({url}, or --download into {default_cache_dir()})"


def _unpickle(blob: bytes) -> dict:
    return pickle.loads(blob, encoding="latin1")


def _batch_arrays(batch: object, label_key: str) -> Arrays:
    """(images uint8 (N, 32, 32, 3), labels int32 (N,)) of one unpickled batch; raises ValueError if malformed."""
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise ValueError(f"not a batch dict with 'data' and {label_key!r}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{label_key!r} has shape {labels.shape}, expected {data.shape[0]} integer labels")
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def read_cifar_python(path: str | Path, dataset: str = "cifar10") -> tuple[dict[str, Arrays], list[str]]:
    """Reads the official python release from its ``.tar.gz`` or its unpacked folder (or the parent).

    Returns ``({split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}, class_names)``. A truncated or
    corrupt tarball or member file raises one DataError naming the file and suggesting to delete it.
    """
    spec = CIFAR_PYTHON[dataset]
    wanted = [*spec["train"], *spec["test"], spec["meta"][0]]
    path = Path(path)
    if path.is_dir() and not looks_like_cifar_python(path, dataset):
        expected = f"expected {spec['url'].rsplit('/', 1)[1]} or its unpacked folder {spec['folder']}/"
        raise DataError(explain_data_dir(path, dataset, expected))
    if path.is_dir():
        folder = path / spec["folder"] if (path / spec["folder"]).is_dir() else path
        try:
            read = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name in wanted}
        except OSError as e:
            raise DataError(f"{folder}: cannot read the cifar python files ({first_line(e)})") from e
    elif path.is_file() and is_image_folder_archive(path):
        raise DataError(
            f"{path}: an archive of an image-folder tree (train/CLASS/*.jpg), not the {dataset} python release; "
            "use --data-source folder (or auto), which unpacks it"
        )
    elif path.is_file():
        try:
            with tarfile.open(path, "r:gz") as tar:
                read = {}
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if member.isfile() and name in wanted:
                        read[name] = tar.extractfile(member).read()
                while tar.fileobj.read(1 << 20):  # to the end of the gzip stream: its CRC catches flipped bytes
                    pass
        except _READ_ERRORS as e:
            raise _corrupt(path, None, e, dataset) from e
    else:
        raise DataError(f"--data-dir {path}: no such file or directory")
    missing = [n for n in wanted if n not in read]
    if missing and path.is_file():  # tarfile stops quietly at a damaged header: the rest looks absent
        raise DataError(
            f"{path}: not the {dataset} python release, or a truncated or corrupt copy (no {', '.join(missing)} "
            f"in it); {_fix(path, dataset)}"
        )
    if missing:
        raise DataError(f"{path}: not the {dataset} python release, missing {', '.join(missing)}")
    out: dict[str, Arrays] = {}
    meta_file, meta_key = spec["meta"]
    name = meta_file
    try:
        class_names = list(_unpickle(read[meta_file])[meta_key])
        for split in SPLITS:
            parts = []
            for name in spec[split]:
                parts.append(_batch_arrays(_unpickle(read[name]), spec["label_key"]))
            out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    except Exception as e:  # pickle raises many types on damaged bytes (UnpicklingError, EOFError, KeyError, ...)
        raise _corrupt(path, name, e, dataset) from e
    return out, class_names
