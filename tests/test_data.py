"""Data sources, subsets and the validation split."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxcifar import sources
from jaxcifar.config import Config
from jaxcifar.data import load_dataset, stratified_split, stratified_subset
from jaxcifar.errors import DataError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_folder(root: Path, per_class: int = 2, classes=CLASSES, size: int = 32) -> np.ndarray:
    """Writes a PNG image-folder tree; returns the train images in listing order."""
    rng = np.random.default_rng(0)
    written = []
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
                if split == "train":
                    written.append(pixels)
    return np.stack(written)


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    labels = np.repeat(np.arange(10), 100)
    chosen, rest = stratified_split(labels, 0.1, seed=3)
    assert len(chosen) == 100 and len(rest) == 900
    assert np.bincount(labels[chosen]).tolist() == [10] * 10
    assert not set(chosen) & set(rest)
    again, _ = stratified_split(labels, 0.1, seed=3)
    other, _ = stratified_split(labels, 0.1, seed=4)
    assert np.array_equal(chosen, again) and not np.array_equal(chosen, other)
    subset = stratified_subset(labels, 37, seed=0)
    assert len(subset) == 37 and np.bincount(labels[subset]).max() - np.bincount(labels[subset]).min() <= 1


def test_synthetic_source_and_val_split():
    data = load_dataset(Config(data_source="synthetic", val_fraction=0.25, batch_size=32, seed=1))
    assert data.train.images.shape[1:] == (32, 32, 3) and data.train.images.dtype == np.uint8
    assert len(data.train) + len(data.val) == 2048 and len(data.val) == 512
    assert data.class_names[0] == "class_0" and data.num_classes == 10


def test_folder_source_decodes_pixels_and_labels(tmp_path):
    expected = write_folder(tmp_path)
    data = load_dataset(Config(data_dir=str(tmp_path), batch_size=4))  # auto -> folder
    assert data.class_names == CLASSES
    np.testing.assert_array_equal(data.train.images, expected)
    np.testing.assert_array_equal(data.train.labels, np.repeat(np.arange(10), 2))
    assert len(data.test) == 20


def test_folder_subset_decodes_only_what_it_keeps(tmp_path):
    write_folder(tmp_path, per_class=3)
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cat/0.png: unreadable image"):
        load_dataset(Config(data_source="folder", data_dir=str(tmp_path), batch_size=4))
    data = load_dataset(Config(data_source="folder", data_dir=str(tmp_path), batch_size=4, train_subset=10, seed=0))
    assert len(data.train) == 10 and sorted(data.train.labels.tolist()) == list(range(10))


def test_folder_rejects_other_sizes_unless_resize(tmp_path):
    write_folder(tmp_path, size=40)
    with pytest.raises(DataError, match=r"40x40, expected 32x32 .*--resize"):
        load_dataset(Config(data_source="folder", data_dir=str(tmp_path), batch_size=4))
    data = load_dataset(Config(data_source="folder", data_dir=str(tmp_path), batch_size=4, resize=True))
    assert data.train.images.shape == (20, 32, 32, 3)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(Config(data_source="folder", data_dir=str(tmp_path / "absent")))
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(Config(data_source="folder", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="3 classes, cifar10 has 10"):
        other = tmp_path / "three"
        write_folder(other, classes=("a", "b", "c"))
        load_dataset(Config(data_source="folder", data_dir=str(other), batch_size=2))


def _cifar_python_tarball(path: Path, n_per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Writes a small tarball in the official CIFAR-10 python layout; returns all train (images, labels)."""
    rng = np.random.default_rng(0)
    train_images, train_labels = [], []
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, obj: dict) -> None:
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            images = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, n_per_batch).tolist()
            flat = images.transpose(0, 3, 1, 2).reshape(n_per_batch, -1)  # row-major R, G, B planes
            add(name, {"data": flat, "labels": labels})
            if name != "test_batch":
                train_images.append(images)
                train_labels += labels
        add("batches.meta", {"label_names": list(CLASSES)})
    return np.concatenate(train_images), np.asarray(train_labels)


def test_cifar_python_tarball(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    images, labels = _cifar_python_tarball(tarball)
    data = load_dataset(Config(data_dir=str(tarball), batch_size=4))  # auto -> cifar-python
    np.testing.assert_array_equal(data.train.images, images)
    np.testing.assert_array_equal(data.train.labels, labels)
    assert data.class_names == CLASSES and len(data.test) == 4
    with pytest.raises(DataError, match=r"md5 .* does not match"):
        sources.verify_md5(tarball, sources.CIFAR_PYTHON["cifar10"]["md5"])
    sources.verify_md5(tarball, sources.md5sum(tarball))


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=8):
        data = load_dataset(Config(data_source="tfds", batch_size=4))
    assert data.train.images.shape == (8, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.train.labels.dtype == np.int32 and data.num_classes == 10


def test_batch_larger_than_train_set_is_refused():
    with pytest.raises(DataError, match="--batch-size 4096 is larger than the 2048"):
        load_dataset(Config(data_source="synthetic", batch_size=4096))


def test_shared_real_images_load(shared_data_dir):
    data = load_dataset(
        Config(data_dir=str(shared_data_dir), train_subset=300, test_subset=100, val_fraction=0.1, batch_size=32)
    )
    assert data.class_names == CLASSES
    assert (len(data.train), len(data.val), len(data.test)) == (270, 30, 100)
    assert np.bincount(data.test.labels).tolist() == [10] * 10
    # real photos: per-channel means near CIFAR's
    np.testing.assert_allclose(data.train.images.mean((0, 1, 2)) / 255, data.mean, atol=0.06)
