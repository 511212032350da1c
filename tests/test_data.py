"""Data sources, subsets and the validation split."""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import time
from pathlib import Path

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxcifar import sources
from jaxcifar.cli import parse_config
from jaxcifar.config import Config
from jaxcifar.data import load_dataset, stratified_split, stratified_subset
from jaxcifar.errors import DataError
from jaxcifar.sources import decode_worker, image_folder
from jaxcifar.train import build_parser

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


# ------------------------------------------------------------------ data that is not what it seems


def _entries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_auto_names_the_parent_when_data_dir_is_one_level_too_deep(tmp_path):
    write_folder(tmp_path, per_class=1)
    before = _entries(tmp_path)
    with pytest.raises(DataError) as error:
        load_dataset(Config(data_dir=str(tmp_path / "train")))  # auto: used to fall back to tfds
    assert str(error.value) == (
        f"--data-dir {tmp_path / 'train'}: no train/ and test/ class folders in it; it holds 10 folders named "
        f"airplane, automobile, bird, cat, ...: did you mean {tmp_path}?"
    )
    with pytest.raises(DataError, match=rf"did you mean {tmp_path}\?$"):  # two levels: one class's images
        load_dataset(Config(data_dir=str(tmp_path / "train" / "cat")))
    with pytest.raises(DataError) as error:
        load_dataset(Config(data_source="folder", data_dir=str(tmp_path / "test")))
    assert str(error.value) == (
        f"--data-dir {tmp_path / 'test'}: missing train/ folder (expected train/CLASS/*.jpg and test/CLASS/*.jpg "
        f"(.png/.jpg/.jpeg) under it); it holds 10 folders named airplane, automobile, bird, cat, ...: did you mean "
        f"{tmp_path}?"
    )
    assert _entries(tmp_path) == before  # nothing built or written into the folders


@pytest.mark.parametrize(
    "layout, message",
    [
        ("empty", r"{d}: it is empty; expected an image-folder tree \(train/CLASS/\*\.jpg and test/CLASS/\*\.jpg\)"),
        ("file", r"{d}: a file that is not a cifar python tarball \(\.tar\.gz/\.tgz\); expected an image-folder"),
        ("train only", r"{d}: has train/ but no test/ folder; expected an image-folder tree"),
        (
            "one level up",
            r"{d}: no train/ and test/ class folders in it; it holds 1 folder named cifar10-jpeg: "
            r"did you mean {d}/cifar10-jpeg\?$",
        ),
        (
            "other",
            r"{d}: no train/ and test/ class folders and no cifar python files in it; it holds 1 folder named "
            r"runs and 1 file named notes\.txt; expected an image-folder tree",
        ),
    ],
)
def test_auto_never_falls_back_to_tfds_with_a_data_dir(tmp_path, monkeypatch, layout, message):
    monkeypatch.setattr(sources, "read_tfds", lambda *a, **k: pytest.fail("fell back to tfds"))
    data_dir = tmp_path / "data"
    if layout == "file":
        data_dir.write_text("not data")
    elif layout == "train only":
        write_folder(data_dir, per_class=1)
        for p in sorted((data_dir / "test").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (data_dir / "test").rmdir()
    else:
        data_dir.mkdir()
        if layout == "one level up":
            write_folder(data_dir / "cifar10-jpeg", per_class=1)
        elif layout == "other":
            (data_dir / "runs").mkdir()
            (data_dir / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=message.format(d=data_dir)) as error:
        load_dataset(Config(data_dir=str(data_dir)))
    assert str(error.value).startswith(f"--data-dir {data_dir}") and "\n" not in str(error.value)


def test_folder_source_with_a_file_or_a_bad_folder(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"x\.txt: a file, not a folder; --data-source folder expected train/CLASS/"):
        load_dataset(Config(data_source="folder", data_dir=str(tmp_path / "x.txt")))
    with pytest.raises(DataError, match=r": missing train/ folder \(expected .*\); it holds 1 file named x\.txt$"):
        load_dataset(Config(data_source="folder", data_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty train class", r"{d}/train/cat: class folder without \.png/\.jpg/\.jpeg images \(it is empty\); every"),
        ("empty test class", r"{d}/test/cat: class folder without \.png/\.jpg/\.jpeg images \(it is empty\)"),
        ("only non-images", r"{d}/train/cat: class folder without .* \(it holds 1 file named 0\.gif\)"),
        ("class missing in test", r"{d}: train/ and test/ class folders differ: train/ has cat that test/ lacks$"),
    ],
)
def test_empty_or_missing_class_folders_are_refused(tmp_path, damage, message):
    write_folder(tmp_path, per_class=2)
    split = "test" if damage in ("empty test class", "class missing in test") else "train"
    for image in (tmp_path / split / "cat").iterdir():
        image.unlink()
    if damage == "only non-images":
        (tmp_path / split / "cat" / "0.gif").write_bytes(b"GIF89a")
    if damage == "class missing in test":
        (tmp_path / split / "cat").rmdir()
    # used to train (empty class: 9 classes' images with 10 logits) and end with NaN per-class accuracies
    with pytest.raises(DataError, match=message.format(d=tmp_path)):
        load_dataset(Config(data_dir=str(tmp_path), batch_size=2))


def test_hidden_files_in_class_folders_are_not_images(tmp_path):
    write_folder(tmp_path, per_class=2)
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble sidecar
    data = load_dataset(Config(data_dir=str(tmp_path), batch_size=2))
    assert len(data.train) == 20


def _damage(tarball: Path, how: str) -> None:
    """Breaks a valid cifar python tarball the way downloads break."""
    blob = tarball.read_bytes()

    def flip(offset: int, n: int = 16) -> bytes:
        return blob[:offset] + bytes(b ^ 0xFF for b in blob[offset : offset + n]) + blob[offset + n :]

    if how == "truncated":  # an interrupted download: EOFError inside gzip
        blob = blob[: len(blob) // 2]
    elif how == "garbled start":  # a damaged deflate stream: zlib.error (as tarfile.ReadError)
        blob = flip(100)
    elif how == "garbled middle":  # flipped bytes in stored data: only the gzip CRC at the end tells
        blob = flip(len(blob) // 2)
    elif how == "garbled trailer":  # the gzip CRC/length trailer itself
        blob = flip(len(blob) - 4, 4)
    elif how == "html":  # an error page saved under the tarball's name: tarfile.ReadError
        blob = b"<html><body>503 Service Unavailable</body></html>"
    tarball.write_bytes(blob)


@pytest.mark.parametrize("how", ["truncated", "garbled start", "garbled middle", "garbled trailer", "html"])
def test_broken_cifar_python_tarball_names_the_file(tmp_path, how):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    _cifar_python_tarball(tarball, n_per_batch=200)
    _damage(tarball, how)
    with pytest.raises(DataError) as error:
        load_dataset(Config(data_dir=str(tarball), batch_size=4))
    message = str(error.value)
    assert message.startswith(f"{tarball}: truncated or corrupt cifar python release (") and "\n" not in message
    assert message.endswith(
        "delete it and download it again (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, "
        f"or --download into {sources.default_cache_dir()})"
    )


def test_corrupt_pickle_in_tarball_or_folder_names_the_member(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
            blob = (
                pickle.dumps({"label_names": list(CLASSES)})[:-5]
                if name == "data_batch_3"
                else pickle.dumps(
                    {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "label_names": list(CLASSES)}
                )
            )
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match=rf"{tarball} \(data_batch_3\): truncated or corrupt .*\(UnpicklingError"):
        load_dataset(Config(data_dir=str(tarball), batch_size=2))
    folder = tmp_path / "unpacked"
    with tarfile.open(tarball) as tar:
        tar.extractall(folder, filter="data")
    with pytest.raises(DataError, match=r"\(data_batch_3\): truncated or corrupt .*; delete the folder and unpack"):
        load_dataset(Config(data_dir=str(folder), batch_size=2))


def test_cifar_python_batches_of_the_wrong_shape_or_labels(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
            labels = [3, 12] if name == "test_batch" else [0, 1]
            blob = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": labels, "label_names": list(CLASSES)})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match=r"cifar-python test labels must be in \[0, 10\) for 10 classes; found 1"):
        load_dataset(Config(data_dir=str(tarball), batch_size=2))


def test_cache_dir_that_is_a_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("JAXCIFAR_CACHE_DIR", str(cache))
    with pytest.raises(DataError) as error:
        load_dataset(Config(data_source="cifar-python", download=True))
    assert str(error.value) == (
        f"cache folder {cache} is a file, not a folder: set JAXCIFAR_CACHE_DIR to a folder (or unset it for "
        "~/.cache/jaxcifar)"
    )
    assert cache.read_text() == "not a folder"


def test_tfds_runtime_dependency_is_declared(tmp_path):
    """tensorflow-datasets 4.9.10 imports importlib_resources to build a dataset without declaring it.

    ``code_path`` is what ``download_and_prepare`` reads first (for the checksums); it raised
    ModuleNotFoundError in a fresh venv (experiments/tfds_arrayrecord/fresh_venv.log).
    """
    import tomllib

    assert tfds.builder("cifar10", data_dir=str(tmp_path)).code_path.name == "cifar.py"
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.replace("-", "_").startswith("importlib_resources") for d in project["dependencies"])
    assert _entries(tmp_path) == []


def test_tfds_without_prepared_data_or_tensorflow_fails_at_once(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else find_spec(name, *a)
    )
    with pytest.raises(DataError) as error:  # used to download for a build that cannot run (minutes of retries)
        load_dataset(Config(data_source="tfds", data_dir=str(tmp_path)))
    assert str(error.value).startswith(
        f"no prepared tfds cifar10/train (ArrayRecord) in --data-dir {tmp_path} (no cifar10/VERSION/dataset_info.json)"
        "; building it needs TensorFlow"
    )
    assert _entries(tmp_path) == []
    write_folder(tmp_path / "jpeg", per_class=1)
    with pytest.raises(DataError, match=r"holds an image-folder tree, not tfds data: use --data-source folder"):
        load_dataset(Config(data_source="tfds", data_dir=str(tmp_path / "jpeg")))


class _BulkOnlySource:
    """A data source that counts bulk reads and refuses single-record reads."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 10, n)
        self.calls: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        raise AssertionError("one call per record")

    def __getitems__(self, keys):
        self.calls.append(len(keys))
        return [{"image": self.images[k], "label": self.labels[k], "id": f"x{k}"} for k in keys]


def test_tfds_split_is_read_in_bulk():
    source = _BulkOnlySource(12_345)
    images, labels = sources.read_tfds_split(source)
    assert source.calls == [5000, 5000, 2345]
    np.testing.assert_array_equal(images, source.images)
    np.testing.assert_array_equal(labels, source.labels)
    assert images.dtype == np.uint8 and labels.dtype == np.int32


def test_auto_recognizes_a_prepared_tfds_data_dir(tmp_path):
    from jaxcifar.data import resolve_source

    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    with pytest.raises(DataError, match=r"it holds 1 folder named cifar10; expected"):  # no dataset_info.json yet
        resolve_source(Config(data_dir=str(tmp_path)))
    (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
    assert resolve_source(Config(data_dir=str(tmp_path))) == "tfds"
    with pytest.raises(DataError, match=r"no train/ and test/ class folders .* holds 1 folder named cifar10"):
        resolve_source(Config(data_dir=str(tmp_path), dataset="cifar100"))


# ------------------------------------------------------------- parallel decoding and the folder cache


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Every test in this file gets its own JAXCIFAR_CACHE_DIR: nothing is read from or written to ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("JAXCIFAR_CACHE_DIR", str(cache))
    return cache


def write_mixed_folder(root: Path, per_class: int = 3, size: int = 32) -> None:
    """Writes a tree of JPEG, PNG and grayscale JPEG images (``size`` x ``size``), 3 classes."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("a", "b", "c"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i % 3 == 0:
                    image.save(root / split / name / f"{i}.png")
                elif i % 3 == 1:
                    image.save(root / split / name / f"{i}.jpg", quality=90)
                else:
                    image.convert("L").save(root / split / name / f"{i}.JPEG")


def _listed(root: Path) -> list[Path]:
    listing, _ = sources.list_image_folder(root)
    return listing["train"][0] + listing["test"][0]


@pytest.mark.parametrize("size, resize", [(32, False), (40, True)])
def test_parallel_decode_equals_serial_decode_bit_for_bit(tmp_path, size, resize):
    write_mixed_folder(tmp_path, per_class=7, size=size)
    paths = _listed(tmp_path)
    serial = np.stack([sources.decode_image(p, resize) for p in paths])
    parallel = sources.decode_images(paths, resize, workers=3)
    assert parallel.dtype == np.uint8 and parallel.shape == (42, 32, 32, 3)
    np.testing.assert_array_equal(parallel, serial)
    np.testing.assert_array_equal(sources.decode_images(paths, resize, workers=1), serial)


def test_parallel_decode_of_real_jpegs_equals_serial(shared_data_dir):
    paths = _listed(shared_data_dir)
    serial = sources.decode_images(paths, workers=1)
    np.testing.assert_array_equal(sources.decode_images(paths, workers=2), serial)
    assert serial.shape == (len(paths), 32, 32, 3) and serial.std() > 30


@pytest.mark.parametrize("bad", ["unreadable", "wrong size"])
@pytest.mark.parametrize("where", [(5, 40), (20, 40)])
def test_parallel_decode_raises_the_serial_decodes_error(tmp_path, caplog, bad, where):
    """The error names the first bad file in listing order, as the serial decode does, wherever it lies.

    48 files in 3 shares of 16: this process decodes the first share, two other processes the others. A
    process that meets the bad image reports it (no "decoding process failed" and a second decode here).
    """
    write_mixed_folder(tmp_path, per_class=8)
    paths = _listed(tmp_path)
    for k in where:
        if bad == "unreadable":
            paths[k].write_bytes(b"not an image")
        else:
            Image.fromarray(np.zeros((33, 32, 3), np.uint8)).save(paths[k], format="PNG")
    with pytest.raises(DataError) as serial:
        sources.decode_images(paths, workers=1)
    with pytest.raises(DataError) as parallel, caplog.at_level("WARNING", logger="jaxcifar.sources"):
        sources.decode_images(paths, workers=3)
    assert str(parallel.value) == str(serial.value) and caplog.records == []
    assert str(serial.value).startswith(f"{paths[where[0]]}: ") and "\n" not in str(serial.value)


def test_parallel_decode_survives_a_failed_worker(tmp_path, monkeypatch, caplog):
    """A decoding process that dies (not for a bad image) has its share decoded in this process, with a warning."""
    write_mixed_folder(tmp_path, per_class=4)
    paths = _listed(tmp_path)
    crash = [sys.executable, "-c", "import sys; sys.exit('worker crashed')"]
    monkeypatch.setattr(decode_worker, "command", lambda parent: crash)
    with caplog.at_level("WARNING", logger="jaxcifar.sources"):
        images = sources.decode_images(paths, workers=2)
    np.testing.assert_array_equal(images, sources.decode_images(paths, workers=1))
    assert [r.getMessage() for r in caplog.records] == [
        "a decoding process failed (worker crashed); decoding its images in this process"
    ]


class _CountingDecoder:
    """Wraps ``decode_images`` where the folder reader calls it and records how many images each call decoded."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[int] = []
        real = sources.decode_images

        def decode(paths, resize=False, workers=None):
            self.calls.append(len(paths))
            return real(paths, resize, workers)

        monkeypatch.setattr(image_folder, "decode_images", decode)


def _cache_entries(cache: Path) -> list[str]:
    folders = cache / "folders"
    return sorted(p.name for p in folders.iterdir()) if folders.is_dir() else []


def _read(root: Path, **kwargs) -> tuple[dict[str, sources.Arrays], list[str]]:
    return sources.read_image_folder(root, **kwargs)


def _assert_same(a: dict[str, sources.Arrays], b: dict[str, sources.Arrays]) -> None:
    for split in ("train", "test"):
        np.testing.assert_array_equal(a[split][0], b[split][0])
        np.testing.assert_array_equal(a[split][1], b[split][1])
        assert a[split][0].dtype == np.uint8 and a[split][1].dtype == np.int32


def test_folder_cache_second_load_decodes_nothing(tmp_path, monkeypatch, _private_cache_dir):
    write_mixed_folder(tmp_path / "data")
    decoder = _CountingDecoder(monkeypatch)
    first, names = _read(tmp_path / "data")
    entries = _cache_entries(_private_cache_dir)
    assert len(entries) == 1 and decoder.calls == [18]
    second, again = _read(tmp_path / "data")
    assert decoder.calls == [18] and again == names == ["a", "b", "c"]
    _assert_same(second, first)
    _assert_same(first, _read(tmp_path / "data", cache=False)[0])
    assert decoder.calls == [18, 18]
    second["train"][0][0] = 0  # the cached arrays are writable, copy-on-write: the entry keeps its pixels
    _assert_same(_read(tmp_path / "data")[0], first)
    # a subset reads the entry too; without the cache it decodes only its images
    subset, _ = _read(tmp_path / "data", select=lambda split, labels: np.array([1, 4]))
    assert decoder.calls == [18, 18]
    np.testing.assert_array_equal(subset["test"][0], first["test"][0][[1, 4]])
    _read(tmp_path / "data", select=lambda split, labels: np.array([1, 4]), cache=False)
    assert decoder.calls == [18, 18, 4]


def test_a_subset_load_caches_the_whole_folder_for_the_next_one(tmp_path, monkeypatch, _private_cache_dir):
    """A subset run (``--train-subset``, e.g. cpu_quick) decodes the whole folder once and stores it, so the
    next subset run, of any size, reads the cache instead of decoding."""
    write_folder(tmp_path / "data", per_class=4)
    decoder = _CountingDecoder(monkeypatch)
    config = Config(data_dir=str(tmp_path / "data"), batch_size=2, train_subset=10, test_subset=20)
    first = load_dataset(config)
    assert decoder.calls == [80] and len(_cache_entries(_private_cache_dir)) == 1
    assert len(first.train) == 10 and len(first.test) == 20
    second = load_dataset(config.replace(train_subset=20))
    assert decoder.calls == [80] and len(second.train) == 20
    chex.assert_shape(second.train.images, (20, 32, 32, 3))
    whole = load_dataset(config.replace(train_subset=None, test_subset=None, folder_cache=False))
    assert decoder.calls == [80, 80]
    np.testing.assert_array_equal(first.test.images, whole.test.images[stratified_subset(whole.test.labels, 20, 0)])


def test_a_bad_image_outside_the_subset_fails_no_subset_load(tmp_path, monkeypatch, caplog, _private_cache_dir):
    """The whole-folder decode of a subset load meets a bad image the subset does not use: one warning, no
    cache entry, and the subset loads as before (decoded alone); a bad image inside the subset still fails."""
    write_mixed_folder(tmp_path / "data")
    bad = _listed(tmp_path / "data")[4]  # train/b/1.jpg, the second train image of class b
    bad.write_bytes(b"not an image")
    decoder = _CountingDecoder(monkeypatch)
    with caplog.at_level("WARNING", logger="jaxcifar.sources"):
        arrays, _ = _read(tmp_path / "data", select=lambda split, labels: np.array([0, 1]))
    assert decoder.calls == [18, 4] and _cache_entries(_private_cache_dir) == []
    ((message),) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"folder cache: not written ({bad}: unreadable image")
    chex.assert_shape(arrays["train"][0], (2, 32, 32, 3))
    with pytest.raises(DataError, match=f"^{bad}: unreadable image"):
        _read(tmp_path / "data", select=lambda split, labels: np.array([0, 4]))
    with pytest.raises(DataError, match=f"^{bad}: unreadable image"):
        _read(tmp_path / "data")


def test_folder_cache_off_reads_and_writes_nothing(tmp_path, monkeypatch, _private_cache_dir):
    write_mixed_folder(tmp_path / "data")
    decoder = _CountingDecoder(monkeypatch)
    _read(tmp_path / "data", cache=False)
    assert not (_private_cache_dir / "folders").exists()
    _read(tmp_path / "data")
    _read(tmp_path / "data", cache=False)
    assert decoder.calls == [18, 18, 18]


def test_no_folder_cache_flag_reaches_the_reader(tmp_path, monkeypatch, _private_cache_dir):
    """``--no-folder-cache`` (Config.folder_cache=False) loads without the cache; the default uses it."""
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for c in range(10):  # CIFAR-10's class count, 2 PNGs each
            (tmp_path / "data" / split / f"class{c}").mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / f"class{c}" / f"{i}.png")
    decoder = _CountingDecoder(monkeypatch)
    argv = ["--data-dir", str(tmp_path / "data"), "--batch-size", "2"]
    off = parse_config(build_parser(), [*argv, "--no-folder-cache"])
    assert off.folder_cache is False and parse_config(build_parser(), argv).folder_cache is True
    load_dataset(off)
    assert not (_private_cache_dir / "folders").exists() and decoder.calls == [40]
    load_dataset(off.replace(folder_cache=True))
    load_dataset(off.replace(folder_cache=True))
    assert len(_cache_entries(_private_cache_dir)) == 1 and decoder.calls == [40, 40]


def _change(root: Path, how: str) -> None:
    """Changes the folder the way ``how`` says; each change must invalidate the cache entry."""
    target = root / "train" / "b" / "1.jpg"
    st = target.stat()
    if how == "changed":
        Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(target, format="JPEG")
    elif how == "same size and mtime":  # e.g. cp --preserve: only the ctime tells
        data = bytearray(target.read_bytes())
        dc = data.index(b"\xff\xdb") + 5  # the first quantization table's DC step: other pixels, same size
        data[dc] = data[dc] + 40
        target.write_bytes(bytes(data))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif how == "added":
        Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(root / "train" / "b" / "9.png")
    elif how == "removed":
        target.unlink()
    elif how == "touched":
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    elif how == "renamed":
        target.rename(root / "train" / "b" / "8.jpg")


@pytest.mark.parametrize("how", ["changed", "same size and mtime", "added", "removed", "touched", "renamed"])
def test_folder_cache_is_invalidated_by_a_changed_file(tmp_path, monkeypatch, _private_cache_dir, how):
    root = tmp_path / "data"
    write_mixed_folder(root)
    _read(root)
    (old_entry,) = _cache_entries(_private_cache_dir)
    _change(root, how)
    assert (root / "train" / "b" / "1.jpg").exists() == (how not in ("removed", "renamed"))
    decoder = _CountingDecoder(monkeypatch)
    arrays, _ = _read(root)
    assert decoder.calls == [18 + {"added": 1, "removed": -1}.get(how, 0)]
    _assert_same(arrays, _read(root, cache=False)[0])
    (new_entry,) = _cache_entries(_private_cache_dir)  # the old state's entry is deleted
    assert new_entry != old_entry and new_entry.split("-")[0] == old_entry.split("-")[0]
    _read(root)
    assert len(decoder.calls) == 2


def test_folder_cache_keys_on_resize_and_absolute_path(tmp_path, monkeypatch, _private_cache_dir):
    write_mixed_folder(tmp_path / "data", size=40)
    decoder = _CountingDecoder(monkeypatch)
    _read(tmp_path / "data", resize=True)
    with pytest.raises(DataError, match="40x40, expected 32x32"):  # not served from the resize=True entry
        _read(tmp_path / "data")
    (tmp_path / "data").rename(tmp_path / "moved")
    _read(tmp_path / "moved", resize=True)
    assert decoder.calls == [18, 18, 18] and len(_cache_entries(_private_cache_dir)) == 1  # data/ is gone
    monkeypatch.chdir(tmp_path)
    _read(Path("moved"), resize=True)  # a relative path names the same folder
    assert len(decoder.calls) == 3


def _damage_entry(entry: Path, how: str) -> None:
    if how == "truncated images":
        data = (entry / "train_images.npy").read_bytes()
        (entry / "train_images.npy").write_bytes(data[: len(data) // 2])
    elif how == "flipped pixel":
        data = bytearray((entry / "test_images.npy").read_bytes())
        data[-1] ^= 1
        (entry / "test_images.npy").write_bytes(bytes(data))
    elif how == "garbage meta":
        (entry / "meta.json").write_text('{"format": 1, "class_')
    elif how == "missing labels":
        (entry / "train_labels.npy").unlink()
    elif how == "wrong labels":
        np.save(entry / "train_labels.npy", np.zeros(9, np.int32))
    elif how == "pickled labels":
        np.save(entry / "test_labels.npy", np.array([None] * 9, object), allow_pickle=True)


@pytest.mark.parametrize(
    "how", ["truncated images", "flipped pixel", "garbage meta", "missing labels", "wrong labels", "pickled labels"]
)
def test_folder_cache_damaged_entry_is_ignored_and_rebuilt(tmp_path, monkeypatch, caplog, _private_cache_dir, how):
    write_mixed_folder(tmp_path / "data")
    expected, _ = _read(tmp_path / "data")
    (name,) = _cache_entries(_private_cache_dir)
    entry = _private_cache_dir / "folders" / name
    _damage_entry(entry, how)
    decoder = _CountingDecoder(monkeypatch)
    with caplog.at_level("WARNING", logger="jaxcifar.sources"):
        arrays, _ = _read(tmp_path / "data")
    _assert_same(arrays, expected)
    (record,) = caplog.records
    assert record.getMessage().startswith(f"ignoring damaged folder cache {entry} (")
    assert record.getMessage().endswith("); decoding the images again") and "\n" not in record.getMessage()
    assert decoder.calls == [18] and _cache_entries(_private_cache_dir) == [name]  # rebuilt
    _assert_same(_read(tmp_path / "data")[0], expected)
    assert decoder.calls == [18]


def test_folder_cache_write_killed_midway_leaves_no_entry(tmp_path, _private_cache_dir):
    """A process killed while writing the cache (os._exit: no cleanup) leaves only a hidden temporary folder,
    which the next load deletes (its writer holds no lock on it any more)."""
    import subprocess
    import sys

    write_mixed_folder(tmp_path / "data")
    script = (
        "import os, numpy as np\n"
        "from jaxcifar import sources\n"
        "def killed(f, array, allow_pickle=False):\n"
        "    f.write(b'\\x93NUMPY' + bytes(100))\n"
        "    f.flush()\n"
        "    os._exit(9)\n"
        "np.save = killed\n"
        f"sources.read_image_folder({str(tmp_path / 'data')!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == 9
    (leftover,) = (_private_cache_dir / "folders").iterdir()
    assert leftover.name.startswith(".") and leftover.name.endswith(".tmp")
    assert _cache_entries(_private_cache_dir) == [leftover.name]
    arrays, _ = _read(tmp_path / "data")
    _assert_same(arrays, _read(tmp_path / "data", cache=False)[0])
    (entry,) = _cache_entries(_private_cache_dir)  # the new entry; the leftover of the dead writer is gone
    assert not entry.startswith(".")
    # A temporary folder that cannot be judged (empty: its writer may be about to lock it) goes after an hour.
    empty = _private_cache_dir / "folders" / ".unjudged.tmp"
    empty.mkdir()
    _read(tmp_path / "data")
    assert empty.is_dir()
    old = time.time() - 2 * 3600
    os.utime(empty, (old, old))
    (_private_cache_dir / "folders" / entry).rename(_private_cache_dir / "x")
    _read(tmp_path / "data")
    assert [n for n in _cache_entries(_private_cache_dir) if n.startswith(".")] == []


@pytest.mark.parametrize("how", ["cache dir is a file", "disk full"])
def test_unwritable_folder_cache_warns_and_loads(tmp_path, monkeypatch, caplog, how):
    write_mixed_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXCIFAR_CACHE_DIR", str(cache))
    if how == "cache dir is a file":
        cache.write_text("not a folder")
        reason = "Not a directory"
    else:
        reason = "No space left on device"

        def full(f, array, allow_pickle=False):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(np, "save", full)
    with caplog.at_level("WARNING", logger="jaxcifar.sources"):
        arrays, _ = _read(tmp_path / "data")
    _assert_same(arrays, _read(tmp_path / "data", cache=False)[0])
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot write the folder cache in {cache / 'folders'} ({reason}); loading without it "
        "(JAXCIFAR_CACHE_DIR sets the cache folder)"
    ]
    if how == "disk full":
        assert list((cache / "folders").iterdir()) == []  # the temporary folder is gone


def test_load_dataset_reads_the_folder_cache(tmp_path, monkeypatch):
    expected = write_folder(tmp_path / "data")
    decoder = _CountingDecoder(monkeypatch)
    for _ in range(2):
        data = load_dataset(Config(data_dir=str(tmp_path / "data"), batch_size=4, val_fraction=0.25))
        np.testing.assert_array_equal(
            np.sort(np.concatenate([data.train.labels, data.val.labels])), np.repeat(np.arange(10), 2)
        )
    assert decoder.calls == [40]
    data = load_dataset(Config(data_dir=str(tmp_path / "data"), batch_size=4))
    np.testing.assert_array_equal(data.train.images, expected)


def test_folder_cache_drops_entries_of_deleted_folders(tmp_path, _private_cache_dir):
    """Each new entry deletes those of folders that are gone (e.g. temporary copies), not those of others."""
    for name in ("gone", "kept", "new"):
        write_mixed_folder(tmp_path / name)
    _read(tmp_path / "gone")
    _read(tmp_path / "kept")
    entries = _cache_entries(_private_cache_dir)
    assert len(entries) == 2
    shutil.rmtree(tmp_path / "gone")
    _read(tmp_path / "new")
    remaining = _cache_entries(_private_cache_dir)
    assert len(remaining) == 2 and len(set(remaining) & set(entries)) == 1
    kept = json.loads(
        (_private_cache_dir / "folders" / (set(remaining) & set(entries)).pop() / "meta.json").read_text()
    )
    assert kept["root"] == str((tmp_path / "kept").resolve())


# ------------------------------------------------------------------------- archives of an image-folder tree


def _tar_folder(root: Path, archive: Path, inner: str = "") -> None:
    """Writes ``root``'s train/ and test/ into the tar archive ``archive`` (compressed after its name), under
    ``inner/`` when given, as ``tar -czf`` would (directories first, then their files)."""
    mode = "w" if archive.name.endswith(".tar") else "w:gz"
    with tarfile.open(archive, mode) as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=f"{inner}/{split}" if inner else split)


@pytest.mark.parametrize("name, inner", [("cifar10-jpeg.tar.gz", ""), ("x.tgz", "cifar10"), ("x.tar", "a/b")])
def test_an_image_folder_archive_is_unpacked_once_and_read(
    tmp_path, monkeypatch, caplog, _private_cache_dir, name, inner
):
    """``--data-dir cifar10-jpeg.tar.gz`` (an archive of train/CLASS/*.jpg, test/CLASS/*.jpg) is unpacked into
    the cache once, with one line saying so, and read like the folder; later loads read that copy (and the
    decoded-image cache), and never say to delete the archive."""
    expected = write_folder(tmp_path / "folder")
    archive = tmp_path / name
    _tar_folder(tmp_path / "folder", archive, inner)
    assert sources.image_folder_in_archive(archive) == inner
    decoder = _CountingDecoder(monkeypatch)
    with caplog.at_level("WARNING", logger="jaxcifar.sources"):
        data = load_dataset(Config(data_dir=str(archive), batch_size=4))  # auto -> folder
    np.testing.assert_array_equal(data.train.images, expected)
    assert data.class_names == CLASSES and len(data.test) == 20
    (unpacked,) = (_private_cache_dir / "unpacked").iterdir()
    assert [r.getMessage() for r in caplog.records] == [
        f"{archive}: an archive of an image-folder tree; unpacking it once into {unpacked} (later runs read that copy)"
    ]
    assert sorted(p.name for p in (unpacked / "train").iterdir()) == sorted(CLASSES)  # the top folders dropped
    caplog.clear()
    again = load_dataset(Config(data_source="folder", data_dir=str(archive), batch_size=4, train_subset=10))
    assert caplog.records == [] and decoder.calls == [40] and len(again.train) == 10
    with pytest.raises(DataError, match=r"an archive of an image-folder tree .*, not the cifar10 python release; use "):
        load_dataset(Config(data_source="cifar-python", data_dir=str(archive), batch_size=4))


def test_a_replaced_archive_is_unpacked_again_and_the_old_copy_deleted(tmp_path, _private_cache_dir):
    write_folder(tmp_path / "folder", per_class=1)
    archive = tmp_path / "data.tar.gz"
    _tar_folder(tmp_path / "folder", archive)
    first = sources.unpack_image_folder_archive(archive)
    assert sources.unpack_image_folder_archive(archive) == first
    (tmp_path / "folder" / "train" / "cat" / "0.png").unlink()
    _tar_folder(tmp_path / "folder", archive)
    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = sources.unpack_image_folder_archive(archive)
    assert second != first and not first.exists()
    assert not (second / "train" / "cat" / "0.png").exists() and (second / "train" / "dog" / "0.png").is_file()


def test_an_archive_unpacks_nothing_outside_its_image_tree(tmp_path, _private_cache_dir):
    """Members with ``..``, absolute names, links and hidden files are never unpacked: only the regular image
    files at SPLIT/CLASS/FILE, so nothing lands outside the cache's copy."""
    write_folder(tmp_path / "folder", per_class=1)
    archive = tmp_path / "evil.tar"
    _tar_folder(tmp_path / "folder", archive)
    payload = (tmp_path / "folder" / "train" / "cat" / "0.png").read_bytes()
    with tarfile.open(archive, "a") as tar:
        escapes = ("train/cat/../../../escaped.png", "../../train/cat/up.png", "/tmp/absolute-escape.png")
        for member_name in (*escapes, "train/cat/.hidden.png", "train/.cat/0.png"):
            info = tarfile.TarInfo(member_name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("train/cat/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    root = sources.unpack_image_folder_archive(archive)
    assert not (tmp_path / "escaped.png").exists() and not (_private_cache_dir / "escaped.png").exists()
    assert not Path("/tmp/absolute-escape.png").exists()
    assert sorted(p.name for p in (root / "train" / "cat").iterdir()) == ["0.png"]
    assert sum(1 for p in root.rglob("*") if p.is_file()) == 20


def test_an_unpack_killed_midway_leaves_no_copy_that_is_read(tmp_path, _private_cache_dir):
    """A process killed while it unpacks (os._exit: no cleanup) leaves only a hidden temporary folder, which the
    next unpack deletes; the next load unpacks and reads every image."""
    import subprocess

    expected = write_folder(tmp_path / "folder")
    archive = tmp_path / "cifar10-jpeg.tar"
    _tar_folder(tmp_path / "folder", archive)
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from jaxcifar import sources\n"
        "import shutil\n"
        "write = shutil.copyfileobj\n"
        "def killed(*args, **kwargs):\n"
        "    write(*args, **kwargs)\n"
        "    os._exit(9)  # after the first image\n"
        "shutil.copyfileobj = killed\n"
        "sources.unpack_image_folder_archive(Path(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    assert subprocess.run([sys.executable, "-c", script, str(archive)], env=env).returncode == 9
    (leftover,) = (_private_cache_dir / "unpacked").iterdir()
    assert leftover.name.startswith(".") and leftover.name.endswith(".tmp") and any(leftover.rglob("*.png"))
    data = load_dataset(Config(data_dir=str(archive), batch_size=4))
    np.testing.assert_array_equal(data.train.images, expected)
    (entry,) = (_private_cache_dir / "unpacked").iterdir()
    assert not entry.name.startswith(".")


def test_a_truncated_archive_ends_in_one_line_and_leaves_no_copy(tmp_path, _private_cache_dir):
    write_folder(tmp_path / "folder", per_class=8)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    _tar_folder(tmp_path / "folder", archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError) as error:
        load_dataset(Config(data_dir=str(archive), batch_size=4))
    assert str(error.value).startswith(f"{archive}: truncated or corrupt archive (")
    assert str(error.value).endswith(
        f"copy it again, or unpack it by hand: mkdir -p data/cifar10-jpeg && tar -xf {archive} -C data/cifar10-jpeg, "
        "then pass --data-dir data/cifar10-jpeg"
    )
    assert "delete" not in str(error.value) and "\n" not in str(error.value)
    assert list((_private_cache_dir / "unpacked").iterdir()) == []
