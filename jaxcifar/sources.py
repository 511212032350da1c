"""Readers that turn each data source into uint8 NHWC arrays, int32 labels and class names.

Every reader returns ``{split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}`` for the splits
``train`` and ``test`` plus the class names. ``jaxcifar.data`` adds subsets and the validation split.
The optional ``select`` callback of the folder reader picks indices before decoding, so a
300-image subset of a 60,000-file tree decodes only 300 files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxcifar.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")

Arrays = tuple[np.ndarray, np.ndarray]
Select = Callable[[str, np.ndarray], np.ndarray]

# The official python release: https://www.cs.toronto.edu/~kriz/cifar.html (md5 published there).
CIFAR_PYTHON = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "label_key": "labels",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "label_key": "fine_labels",
    },
}


def default_cache_dir() -> Path:
    """Returns ``$JAXCIFAR_CACHE_DIR`` or ``~/.cache/jaxcifar``."""
    return Path(os.environ.get("JAXCIFAR_CACHE_DIR", Path.home() / ".cache" / "jaxcifar"))


# ---------------------------------------------------------------------------------------- folder


def list_image_folder(root: str | Path) -> tuple[dict[str, tuple[list[Path], np.ndarray]], list[str]]:
    """Lists ``root/{train,test}/<class>/*.{png,jpg,jpeg}`` without decoding.

    Returns ``({split: (files, labels int32 (N,))}, class_names)``; class index = sorted folder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: no such directory (expected train/<class>/ and test/<class>/)")
    listing: dict[str, tuple[list[Path], np.ndarray]] = {}
    class_names: list[str] | None = None
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"--data-dir {root}: missing {split}/ folder (expected train/<class>/ and test/<class>/)")
        names = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not names:
            raise DataError(f"{split_dir}: no class folders")
        if class_names is None:
            class_names = names
        elif names != class_names:
            raise DataError(f"{split_dir}: class folders {names} differ from train's {class_names}")
        files: list[Path] = []
        labels: list[int] = []
        for index, name in enumerate(names):
            found = sorted(
                p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            files += found
            labels += [index] * len(found)
        if not files:
            raise DataError(f"{split_dir}: no .png/.jpg/.jpeg images in its class folders")
        listing[split] = (files, np.asarray(labels, np.int32))
    assert class_names is not None
    return listing, class_names


def decode_image(path: Path, resize: bool) -> np.ndarray:
    """Returns one image file as uint8 (32, 32, 3) RGB; other sizes are resized or rejected."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                if not resize:
                    raise DataError(
                        f"{path}: image is {image.size[0]}x{image.size[1]}, expected 32x32 "
                        "(pass --resize to resize such images)"
                    )
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(image, np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: unreadable image ({e.__class__.__name__})") from e


def read_image_folder(
    root: str | Path, select: Select | None = None, resize: bool = False
) -> tuple[dict[str, Arrays], list[str]]:
    """Reads an image-folder tree. ``select(split, labels) -> indices`` limits what is decoded."""
    listing, class_names = list_image_folder(root)
    out: dict[str, Arrays] = {}
    for split, (files, labels) in listing.items():
        keep = np.arange(len(files)) if select is None else select(split, labels)
        images = np.empty((len(keep), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for i, k in enumerate(keep):
            images[i] = decode_image(files[k], resize)
        out[split] = (images, labels[keep])
    return out, class_names


# ----------------------------------------------------------------------------------- cifar-python


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
    cache_dir.mkdir(parents=True, exist_ok=True)
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
        raise DataError(f"{path}: md5 {actual} does not match the published {expected}; delete it and retry")


def _unpickle(blob: bytes) -> dict:
    return pickle.loads(blob, encoding="latin1")


def read_cifar_python(path: str | Path, dataset: str = "cifar10") -> tuple[dict[str, Arrays], list[str]]:
    """Reads the official python release from its ``.tar.gz`` or its unpacked folder (or the parent)."""
    spec = CIFAR_PYTHON[dataset]
    path = Path(path)
    if path.is_dir():
        folder = path / spec["folder"] if (path / spec["folder"]).is_dir() else path
        members = {p.name: p.read_bytes for p in folder.iterdir() if p.is_file()}
        read = {name: fn() for name, fn in members.items() if name in spec["train"] + spec["test"] + [spec["meta"][0]]}
    elif path.is_file():
        try:
            with tarfile.open(path, "r:gz") as tar:
                read = {}
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if member.isfile() and name in spec["train"] + spec["test"] + [spec["meta"][0]]:
                        read[name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{path}: not a readable cifar python tarball ({e})") from e
    else:
        raise DataError(f"--data-dir {path}: no such file or directory")
    missing = [n for n in spec["train"] + spec["test"] + [spec["meta"][0]] if n not in read]
    if missing:
        raise DataError(f"{path}: not the {dataset} python release, missing {', '.join(missing)}")
    out: dict[str, Arrays] = {}
    for split in SPLITS:
        batches = [_unpickle(read[name]) for name in spec[split]]
        data = np.concatenate([np.asarray(b["data"], np.uint8) for b in batches])
        images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
        labels = np.concatenate([np.asarray(b[spec["label_key"]], np.int32) for b in batches])
        out[split] = (np.ascontiguousarray(images), labels)
    meta_file, meta_key = spec["meta"]
    class_names = list(_unpickle(read[meta_file])[meta_key])
    return out, class_names


def looks_like_cifar_python(path: Path, dataset: str) -> bool:
    """True when ``path`` is the official tarball or (a parent of) its unpacked folder."""
    spec = CIFAR_PYTHON[dataset]
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz"))
    return (path / spec["folder"]).is_dir() or (path / spec["test"][0]).is_file()


# ------------------------------------------------------------------------------------------- tfds


def read_tfds(dataset: str, data_dir: str | None = None) -> tuple[dict[str, Arrays], list[str]]:
    """Reads ``tfds.data_source(dataset)`` (no TensorFlow needed once the data is built)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a core dependency
        raise DataError("tensorflow-datasets is not installed (pip install tensorflow-datasets)") from e
    out: dict[str, Arrays] = {}
    class_names: list[str] = []
    for split in SPLITS:
        try:
            source = tfds.data_source(dataset, split=split, data_dir=data_dir)
            records = [source[i] for i in range(len(source))]
            class_names = list(source.dataset_info.features["label"].names)
        except Exception as e:
            raise DataError(
                f"tfds could not provide {dataset}/{split} ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); "
                "building it needs TensorFlow and internet once (pip install tensorflow-cpu), or use "
                "--data-source folder/cifar-python with --data-dir"
            ) from e
        images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
        labels = np.asarray([int(r["label"]) for r in records], np.int32)
        out[split] = (images, labels)
    return out, class_names


# -------------------------------------------------------------------------------------- synthetic


def make_synthetic(
    num_train: int = 2048, num_test: int = 512, num_classes: int = 10, seed: int = 0
) -> tuple[dict[str, Arrays], list[str]]:
    """A learnable toy problem: each class is a fixed smooth random color pattern plus pixel noise.

    Patterns are 4x4 color blocks upsampled to 32x32, so crops and flips keep them recognizable.
    Returns uint8 images; a small ResNet separates the classes within a few dozen steps.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    prototypes = coarse.repeat(IMAGE_SIZE // 4, axis=1).repeat(IMAGE_SIZE // 4, axis=2)
    out: dict[str, Arrays] = {}
    for split, n in (("train", num_train), ("test", num_test)):
        labels = (np.arange(n) % num_classes).astype(np.int32)
        rng.shuffle(labels)
        noise = rng.normal(0, 40, size=(n, IMAGE_SIZE, IMAGE_SIZE, 3))
        images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        out[split] = (images, labels)
    return out, [f"class_{i}" for i in range(num_classes)]
