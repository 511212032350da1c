"""Times ``jaxcifar.data.load_dataset`` with ``data_source="tfds"`` on a built tfds data_dir; appends one line.

    python experiments/tfds_arrayrecord/time_load.py --data-dir /tmp/tfds_data --label after \
        [--compare-folder /tmp/cifar] >> experiments/tfds_arrayrecord/load_times.txt

Runs in the project's venv (no TensorFlow). The line gives the wall time of the whole load (open both
splits, read and decode all records, build the arrays), the image counts, and a content digest: the
sha256 of the sorted per-image sha256s of (label, pixels), independent of record order. With
``--compare-folder`` it also loads the JPEG folder tree the data was built from (``data_source="folder"``)
and prints whether the two hold the same (image, label) pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import time

import numpy as np

from jaxcifar import Config
from jaxcifar.data import load_dataset


def digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over the sorted sha256s of each (label, image) pair: the same for any record order."""
    rows = sorted(hashlib.sha256(bytes([int(y)]) + x.tobytes()).digest() for x, y in zip(images, labels, strict=True))
    return hashlib.sha256(b"".join(rows)).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--compare-folder")
    args = parser.parse_args()
    start = time.perf_counter()
    data = load_dataset(Config(data_source="tfds", data_dir=args.data_dir))
    seconds = time.perf_counter() - start
    train, test = digest(data.train.images, data.train.labels), digest(data.test.images, data.test.labels)
    line = (
        f"{args.label}: load_dataset(data_source='tfds') {len(data.train)} train + {len(data.test)} test records in "
        f"{seconds:.1f}s ({platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
        f"cores); digest train {train} test {test}"
    )
    if args.compare_folder:
        start = time.perf_counter()
        folder = load_dataset(Config(data_source="folder", data_dir=args.compare_folder))
        same = (digest(folder.train.images, folder.train.labels), digest(folder.test.images, folder.test.labels)) == (
            train,
            test,
        )
        line += f"; the JPEG folder tree (loaded in {time.perf_counter() - start:.1f}s) holds the same pairs: {same}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
