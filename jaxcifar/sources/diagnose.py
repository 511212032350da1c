"""What a ``--data-dir`` holds: recognizers for each source's layout, and the one line that says what a
path holds instead of a dataset, with a guess of the right path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jaxcifar.sources.common import CIFAR_PYTHON, IMAGE_EXTENSIONS, SPLITS

# What a --data-dir may hold, for messages.
EXPECTED_DATA_DIR = (
    "expected an image-folder tree (train/CLASS/*.jpg and test/CLASS/*.jpg), the cifar python tarball "
    "(cifar-10-python.tar.gz) or its unpacked folder, or a prepared tfds data folder"
)
EXPECTED_FOLDER = "expected train/CLASS/*.jpg and test/CLASS/*.jpg (.png/.jpg/.jpeg) under it"


def visible(path: Path) -> list[Path]:
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
    entries = visible(path)
    folders = [p for p in entries if p.is_dir()]
    files = [p for p in entries if not p.is_dir()]
    if not entries:
        return "it is empty"
    parts = [_named(folders, "folder")] if folders else []
    parts += [_named(files, "file")] if files else []
    return "it holds " + " and ".join(parts)


def has_images(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one .png/.jpg/.jpeg file."""
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in visible(folder))


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
    folders = [p for p in visible(path) if p.is_dir()]
    if folders and all(has_images(p) for p in folders):
        parent = path.resolve().parent
        if is_image_folder_dataset(parent) or path.name in SPLITS:
            return f": did you mean {parent}?"
        return ": these look like the class folders of one split; --data-dir takes the folder holding train/ and test/"
    for child in visible(path):
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
    if not visible(path):
        return f"{where}: {contents}; {expected}"
    return f"{where}: no train/ and test/ class folders and no cifar python files in it; {contents}; {expected}"


def looks_like_cifar_python(path: Path, dataset: str) -> bool:
    """True when ``path`` is the official tarball or (a parent of) its unpacked folder."""
    spec = CIFAR_PYTHON[dataset]
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz"))
    return (path / spec["folder"]).is_dir() or (path / spec["test"][0]).is_file()
