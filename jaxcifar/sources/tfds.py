"""The tfds source: ``tfds.data_source`` (ArrayRecord; no TensorFlow once the data is prepared), read in bulk."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcifar.errors import DataError
from jaxcifar.sources.common import IMAGE_SIZE, SPLITS, Arrays, first_line
from jaxcifar.sources.diagnose import is_image_folder_dataset, is_tfds_data_dir, looks_like_cifar_python

TFDS_CHUNK = 5000  # records per bulk ArrayRecord read (about 13 MB of encoded CIFAR records)


def _tfds_records(source: Sequence, start: int, stop: int) -> Sequence:
    """Records ``start:stop`` of a tfds data source, read in one bulk ``__getitems__`` call.

    ArrayRecord sources read all the keys in one call (no Python call per record to fetch them; tfds
    still decodes each image). ``tfds.testing.mock_data``'s sources (tensorflow-datasets 4.9.10) have a
    broken ``__getitems__`` (TypeError): they are read one record at a time.
    """
    keys = list(range(start, stop))
    try:
        return source.__getitems__(keys)
    except TypeError:
        return [source[k] for k in keys]


def read_tfds_split(source: Sequence, chunk: int = TFDS_CHUNK) -> Arrays:
    """Reads every record of one tfds split; returns (images uint8 (N, 32, 32, 3), labels int32 (N,))."""
    n = len(source)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        records = _tfds_records(source, start, stop)
        images[start:stop] = [r["image"] for r in records]
        labels[start:stop] = [r["label"] for r in records]
    return images, labels


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silences tfds's absl warnings (e.g. "Variant folder ... has no dataset_info.json") for a probe."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_tfds(tfds: Any, dataset: str, split: str, data_dir: str | None) -> Any:
    """``tfds.data_source`` of prepared data; builds it (download + prepare) only where TensorFlow is installed.

    Without TensorFlow a build cannot run, so unprepared data raises DataError at once rather than
    downloading the release first.
    """
    try:
        with _quiet_absl():
            return tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        if isinstance(e, ImportError) and e.name not in (None, "tensorflow"):  # a dependency tfds does not declare
            raise DataError(f"tensorflow-datasets cannot run ({first_line(e)}): pip install {e.name}") from e
        if importlib.util.find_spec("tensorflow") is not None:
            return tfds.data_source(dataset, split=split, data_dir=data_dir)  # builds it once, as on Colab
        root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")
        where = f"--data-dir {root}" if data_dir else f"{root} (tfds's data folder; --data-dir or $TFDS_DATA_DIR)"
        found = first_line(e) if is_tfds_data_dir(root, dataset) else f"no {dataset}/VERSION/dataset_info.json"
        raise DataError(
            f"no prepared tfds {dataset}/{split} (ArrayRecord) in {where} ({found}); building it needs "
            "TensorFlow and internet once: pip install 'jaxcifar[tfds]', or use --data-source folder/cifar-python "
            "with --data-dir"
        ) from e


def read_tfds(dataset: str, data_dir: str | None = None) -> tuple[dict[str, Arrays], list[str]]:
    """Reads ``tfds.data_source(dataset)`` (no TensorFlow needed once the data is built).

    Returns ``({split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}, class_names)``. Records are
    read in bulk, ``TFDS_CHUNK`` at a time. Data not prepared in ``data_dir`` (default: tfds's) is built
    where TensorFlow is installed, and refused at once (one DataError) where it is not.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a core dependency
        raise DataError("tensorflow-datasets is not installed (pip install tensorflow-datasets)") from e
    if data_dir is not None:
        path = Path(data_dir)
        if path.is_file():
            raise DataError(f"--data-dir {path}: a file; --data-source tfds takes a tfds data folder")
        if path.is_dir() and not is_tfds_data_dir(path, dataset):
            if is_image_folder_dataset(path):
                raise DataError(
                    f"--data-dir {path} holds an image-folder tree, not tfds data: use --data-source folder"
                )
            if looks_like_cifar_python(path, dataset):
                raise DataError(
                    f"--data-dir {path} holds the cifar python release, not tfds data: use --data-source cifar-python"
                )
    out: dict[str, Arrays] = {}
    class_names: list[str] = []
    for split in SPLITS:
        try:
            source = _open_tfds(tfds, dataset, split, data_dir)
            class_names = list(source.dataset_info.features["label"].names)
            out[split] = read_tfds_split(source)
        except DataError:
            raise
        except Exception as e:
            raise DataError(
                f"tfds could not provide {dataset}/{split} ({first_line(e)}); building it needs TensorFlow and "
                "internet once (pip install 'jaxcifar[tfds]'), or use --data-source folder/cifar-python with --data-dir"
            ) from e
    return out, class_names
