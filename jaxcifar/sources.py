"""Readers that turn each data source into uint8 NHWC arrays, int32 labels and class names.

Every reader returns ``{split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}`` for the splits
``train`` and ``test`` plus the class names. ``jaxcifar.data`` adds subsets and the validation split.
The optional ``select`` callback of the folder reader picks indices before decoding, so a
300-image subset of a 60,000-file tree decodes only 300 files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pickle
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

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


# What a --data-dir may hold, for messages.
EXPECTED_DATA_DIR = (
    "expected an image-folder tree (train/CLASS/*.jpg and test/CLASS/*.jpg), the cifar python tarball "
    "(cifar-10-python.tar.gz) or its unpacked folder, or a prepared tfds data folder"
)
EXPECTED_FOLDER = "expected train/CLASS/*.jpg and test/CLASS/*.jpg (.png/.jpg/.jpeg) under it"


def default_cache_dir() -> Path:
    """Returns ``$JAXCIFAR_CACHE_DIR`` (when set and not empty) or ``~/.cache/jaxcifar``."""
    return Path(os.environ.get("JAXCIFAR_CACHE_DIR") or Path.home() / ".cache" / "jaxcifar")


# ------------------------------------------------------------------------------ what --data-dir holds


def _visible(path: Path) -> list[Path]:
    """The entries of a folder, sorted, without hidden ones (``.DS_Store``, ``._x``); [] if unreadable."""
    try:
        return sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def _named(paths: Sequence[Path], kind: str, limit: int = 4) -> str:
    """``10 folders named airplane, automobile, bird, cat, ...`` (at most ``limit`` names)."""
    names = ", ".join(p.name for p in paths[:limit]) + (", ..." if len(paths) > limit else "")
    return f"{len(paths)} {kind}{'' if len(paths) == 1 else 's'} named {names}"


def describe_contents(path: Path) -> str:
    """One phrase saying what a folder holds, e.g. ``it holds 10 folders named airplane, ...``."""
    entries = _visible(path)
    folders = [p for p in entries if p.is_dir()]
    files = [p for p in entries if not p.is_dir()]
    if not entries:
        return "it is empty"
    parts = [_named(folders, "folder")] if folders else []
    parts += [_named(files, "file")] if files else []
    return "it holds " + " and ".join(parts)


def has_images(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one .png/.jpg/.jpeg file."""
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in _visible(folder))


def is_image_folder_dataset(path: Path) -> bool:
    """True when ``path`` has both a ``train/`` and a ``test/`` folder (their contents are checked on reading)."""
    return (path / "train").is_dir() and (path / "test").is_dir()


def is_tfds_data_dir(path: Path, dataset: str) -> bool:
    """True when ``path`` holds a prepared tfds ``dataset`` (``path/dataset/VERSION/dataset_info.json``)."""
    return any((path / dataset).glob("*/dataset_info.json"))


def guess_data_dir(path: Path, dataset: str) -> str:
    """``": did you mean X?"`` for a folder that is one or two levels too deep or one too high, else ``""``.

    Too deep: ``DIR/train`` (a split's class folders) or ``DIR/train/cat`` (one class's images) instead of
    ``DIR``; too high: a folder whose child holds the dataset (``DIR/..``).
    """
    if has_images(path):
        grandparent = path.resolve().parent.parent
        return f": did you mean {grandparent}?" if is_image_folder_dataset(grandparent) else ""
    folders = [p for p in _visible(path) if p.is_dir()]
    if folders and all(has_images(p) for p in folders):
        parent = path.resolve().parent
        if is_image_folder_dataset(parent) or path.name in SPLITS:
            return f": did you mean {parent}?"
        return ": these look like the class folders of one split; --data-dir takes the folder holding train/ and test/"
    for child in _visible(path):
        if (
            is_image_folder_dataset(child)
            or looks_like_cifar_python(child, dataset)
            or is_tfds_data_dir(child, dataset)
        ):
            return f": did you mean {child}?"
    return ""


def explain_data_dir(path: Path, dataset: str, expected: str = EXPECTED_DATA_DIR) -> str:
    """One line for a --data-dir that holds no usable dataset: what it holds, what was expected, a guess.

    Guesses (``guess_data_dir``): a split's class folders (``DIR/train`` instead of ``DIR``: "did you mean
    DIR?"), one class's images, a folder that holds the dataset one level down; also train/ without test/.
    """
    where = f"--data-dir {path}"
    if not path.exists():
        return f"{where}: no such file or directory ({expected})"
    if not path.is_dir():
        return f"{where}: a file that is not a cifar python tarball (.tar.gz/.tgz); {expected}"
    if (path / "train").is_dir() != (path / "test").is_dir():
        present, absent = ("train", "test") if (path / "train").is_dir() else ("test", "train")
        return f"{where}: has {present}/ but no {absent}/ folder; {expected}"
    contents = describe_contents(path)
    guess = guess_data_dir(path, dataset)
    if has_images(path):
        return f"{where}: images, not train/ and test/ class folders; {contents}{guess or '; ' + expected}"
    if guess:
        return f"{where}: no train/ and test/ class folders in it; {contents}{guess}"
    if not _visible(path):
        return f"{where}: {contents}; {expected}"
    return f"{where}: no train/ and test/ class folders and no cifar python files in it; {contents}; {expected}"


# ---------------------------------------------------------------------------------------- folder


def list_image_folder(
    root: str | Path, dataset: str = "cifar10"
) -> tuple[dict[str, tuple[list[Path], np.ndarray]], list[str]]:
    """Lists ``root/{train,test}/<class>/*.{png,jpg,jpeg}`` without decoding.

    Returns ``({split: (files, labels int32 (N,))}, class_names)``; class index = sorted folder names.
    Raises DataError (one line) when ``root`` is not such a tree (saying what it holds instead), when a
    class folder holds no image, or when train/ and test/ have different class folders.
    """
    root = Path(root)
    if not root.is_dir():
        if not root.exists():
            raise DataError(f"--data-dir {root}: no such directory ({EXPECTED_FOLDER})")
        raise DataError(f"--data-dir {root}: a file, not a folder; --data-source folder {EXPECTED_FOLDER}")
    if not is_image_folder_dataset(root):
        missing = "test" if (root / "train").is_dir() else "train"
        raise DataError(
            f"--data-dir {root}: missing {missing}/ folder ({EXPECTED_FOLDER}); {describe_contents(root)}"
            f"{guess_data_dir(root, dataset)}"
        )
    listing: dict[str, tuple[list[Path], np.ndarray]] = {}
    class_names: list[str] | None = None
    for split in SPLITS:
        split_dir = root / split
        names = [d.name for d in _visible(split_dir) if d.is_dir()]
        if not names:
            raise DataError(f"{split_dir}: no class folders ({describe_contents(split_dir)}); {EXPECTED_FOLDER}")
        if class_names is None:
            class_names = names
        elif names != class_names:
            only_train = sorted(set(class_names) - set(names))
            only_test = sorted(set(names) - set(class_names))
            problems = ([f"train/ has {', '.join(only_train)} that test/ lacks"] if only_train else []) + (
                [f"test/ has {', '.join(only_test)} that train/ lacks"] if only_test else []
            )
            raise DataError(f"{root}: train/ and test/ class folders differ: {'; '.join(problems)}")
        files: list[Path] = []
        labels: list[int] = []
        for index, name in enumerate(names):
            found = sorted(
                p for p in _visible(split_dir / name) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not found:
                contents = describe_contents(split_dir / name)
                raise DataError(
                    f"{split_dir / name}: class folder without .png/.jpg/.jpeg images ({contents}); every class "
                    "needs images in train/ and test/"
                )
            files += found
            labels += [index] * len(found)
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
    root: str | Path, select: Select | None = None, resize: bool = False, dataset: str = "cifar10"
) -> tuple[dict[str, Arrays], list[str]]:
    """Reads an image-folder tree. ``select(split, labels) -> indices`` limits what is decoded."""
    listing, class_names = list_image_folder(root, dataset)
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


# What a broken download raises while reading: truncated gzip (EOFError), bad gzip/tar headers
# (tarfile.ReadError, gzip.BadGzipFile is an OSError), corrupt deflate data (zlib.error).
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 120 characters)."""
    text = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
    return f"{error.__class__.__name__}: {text}" if text else error.__class__.__name__


def _corrupt(path: Path, member: str | None, error: BaseException, dataset: str) -> DataError:
    """The one-line error for a truncated or corrupt release: names the file, suggests deleting it."""
    where = f"{path} ({member})" if member else str(path)
    return DataError(
        f"{where}: truncated or corrupt cifar python release ({_first_line(error)}); {_fix(path, dataset)}"
    )


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
            raise DataError(f"{folder}: cannot read the cifar python files ({_first_line(e)})") from e
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


def looks_like_cifar_python(path: Path, dataset: str) -> bool:
    """True when ``path`` is the official tarball or (a parent of) its unpacked folder."""
    spec = CIFAR_PYTHON[dataset]
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz"))
    return (path / spec["folder"]).is_dir() or (path / spec["test"][0]).is_file()


# ------------------------------------------------------------------------------------------- tfds


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
            raise DataError(f"tensorflow-datasets cannot run ({_first_line(e)}): pip install {e.name}") from e
        if importlib.util.find_spec("tensorflow") is not None:
            return tfds.data_source(dataset, split=split, data_dir=data_dir)  # builds it once, as on Colab
        root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")
        where = f"--data-dir {root}" if data_dir else f"{root} (tfds's data folder; --data-dir or $TFDS_DATA_DIR)"
        found = _first_line(e) if is_tfds_data_dir(root, dataset) else f"no {dataset}/VERSION/dataset_info.json"
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
                f"tfds could not provide {dataset}/{split} ({_first_line(e)}); building it needs TensorFlow and "
                "internet once (pip install 'jaxcifar[tfds]'), or use --data-source folder/cifar-python with --data-dir"
            ) from e
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
