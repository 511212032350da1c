"""Builds tfds ``cifar10`` (version 3.0.2, ArrayRecord files) from the shared CIFAR-10 JPEG image folders.

Needs TensorFlow (tfds's writer uses it), so run it in a throwaway venv, not the project's::

    python3 -m venv /tmp/tfbuild
    /tmp/tfbuild/bin/pip install tensorflow-cpu tensorflow-datasets importlib_resources array_record pillow
    /tmp/tfbuild/bin/python experiments/tfds_arrayrecord/build.py --images /tmp/cifar --data-dir /tmp/tfds_data

The result is what ``tfds.data_source("cifar10", data_dir=...)`` opens on Colab after the official build
(the same builder, features, version and split names): only the examples come from the JPEG folders
(``images/{train,test}/CLASS/*.jpg``, decoded to RGB and stored as tfds stores them, PNG-encoded)
instead of the official binary tarball, which this machine cannot download. The official builder's
``_split_generators`` is replaced on its class for this process only; everything else (features,
``DatasetInfo``, the ArrayRecord writer and its shuffling, ``dataset_info.json``) is tfds's own.
Prints one line per split and the total build time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import cifar

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
EXTENSIONS = (".jpg", ".jpeg", ".png")


def folder_examples(split_dir: Path, prefix: str):
    """Yields (key, example) for every image of ``split_dir/CLASS/``, classes in CIFAR-10's label order."""
    index = 0
    for label, name in enumerate(CLASSES):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise SystemExit(f"{split_dir / name}: no images")
        for path in files:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), np.uint8)
            if pixels.shape != (32, 32, 3):
                raise SystemExit(f"{path}: {pixels.shape}, expected (32, 32, 3)")
            yield index, {"id": f"{prefix}{index:05d}", "image": pixels, "label": label}
            index += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder holding train/CLASS/ and test/CLASS/")
    parser.add_argument("--data-dir", type=Path, required=True, help="tfds data_dir to build into (e.g. /tmp/tfds)")
    args = parser.parse_args()
    for split in ("train", "test"):
        if not (args.images / split).is_dir():
            raise SystemExit(f"{args.images}: no {split}/ folder")

    def split_generators(self, dl_manager):  # replaces the download of the official binary tarball
        self.info.features["label"].names = list(CLASSES)
        return {
            tfds.Split.TRAIN: folder_examples(args.images / "train", "train_"),
            tfds.Split.TEST: folder_examples(args.images / "test", "test_"),
        }

    cifar.Cifar10._split_generators = split_generators
    start = time.perf_counter()
    builder = tfds.builder("cifar10", data_dir=str(args.data_dir), file_format="array_record")
    builder.download_and_prepare()
    seconds = time.perf_counter() - start
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} examples in {len(info.filenames)} ArrayRecord file(s)")
    print(f"built {builder.info.full_name} into {builder.data_dir} in {seconds:.1f}s")


if __name__ == "__main__":
    main()
