"""The image-folder source: ``train/CLASS/*.jpg`` and ``test/CLASS/*.jpg`` (or a tar archive of such a tree,
unpacked once into the cache), listed, decoded in parallel and kept in the decoded-image cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from jaxcifar.errors import DataError
from jaxcifar.sources.archive import is_image_folder_archive, unpack_image_folder_archive
from jaxcifar.sources.cache import folder_cache_entry, load_folder_cache, remove_abandoned, write_folder_cache
from jaxcifar.sources.common import IMAGE_EXTENSIONS, SPLITS, Arrays, Select
from jaxcifar.sources.decode import decode_images
from jaxcifar.sources.diagnose import (
    EXPECTED_FOLDER,
    describe_contents,
    guess_data_dir,
    is_image_folder_dataset,
    visible,
)

log = logging.getLogger(__name__)

Listing = dict[str, tuple[list[Path], np.ndarray]]  # {split: (files, labels int32 (N,))}


def _image_files(folder: Path) -> list[Path]:
    """The .png/.jpg/.jpeg files directly in ``folder``, sorted by name, hidden ones left out; [] if unreadable.

    One ``os.scandir`` pass: the entry type comes from the directory listing, so a 60,000-file tree is
    listed without a ``stat`` per file (symbolic links are followed, as ``Path.is_file`` does).
    """
    try:
        with os.scandir(folder) as entries:
            names = [
                e.name
                for e in entries
                if not e.name.startswith(".")
                and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                and e.is_file()
            ]
    except OSError:
        return []
    return [folder / name for name in sorted(names, key=os.path.normcase)]  # the order of sorted(Path)


def list_image_folder(root: str | Path, dataset: str = "cifar10") -> tuple[Listing, list[str]]:
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
    listing: Listing = {}
    class_names: list[str] | None = None
    for split in SPLITS:
        split_dir = root / split
        names = [d.name for d in visible(split_dir) if d.is_dir()]
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
            found = _image_files(split_dir / name)
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


def read_image_folder(
    root: str | Path,
    select: Select | None = None,
    resize: bool = False,
    dataset: str = "cifar10",
    cache: bool = True,
    workers: int | None = None,
) -> tuple[dict[str, Arrays], list[str]]:
    """Reads an image-folder tree; returns ``({split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}, class_names)``.

    ``root`` may also be a tar archive (.tar, .tar.gz, .tgz) of such a tree: it is unpacked once into the
    cache (``unpack_image_folder_archive``) and read from there. ``select(split, labels) -> indices`` picks
    the images returned. ``workers`` processes decode the images (``decode_images``; None: one per CPU).
    With ``cache``, the first load decodes every image of the folder, subset or not, and stores the arrays
    under ``folder_cache_root()``; later loads of the unchanged folder (``folder_cache_entry``) read them
    from there, subsets included, instead of decoding. ``cache=False`` neither reads nor writes the cache
    and decodes only the selected images.
    """
    root = Path(root)
    if root.is_file() and is_image_folder_archive(root):
        root = unpack_image_folder_archive(root)
    listing, class_names = list_image_folder(root, dataset)
    keep = {
        split: np.arange(len(files)) if select is None else np.asarray(select(split, labels))
        for split, (files, labels) in listing.items()
    }
    whole = {split: np.array_equal(keep[split], np.arange(len(files))) for split, (files, _) in listing.items()}
    everything = _cached_or_decoded(root, listing, class_names, resize, workers, all(whole.values())) if cache else None
    out: dict[str, Arrays] = {}
    if everything is not None:
        for split, (_, labels) in listing.items():
            out[split] = (everything[split] if whole[split] else everything[split][keep[split]], labels[keep[split]])
        return out, class_names
    paths = [listing[split][0][k] for split in listing for k in keep[split]]
    decoded = decode_images(paths, resize, workers)
    start = 0
    for split, (_, labels) in listing.items():
        stop = start + len(keep[split])
        out[split] = (decoded[start:stop], labels[keep[split]])
        start = stop
    return out, class_names


def _cached_or_decoded(
    root: Path, listing: Listing, class_names: list[str], resize: bool, workers: int | None, everything_wanted: bool
) -> dict[str, np.ndarray] | None:
    """Returns ``{split: images uint8 (N, 32, 32, 3)}`` of every listed file, from the cache entry, or decoded
    and then stored there. None when no entry can be named (a file cannot be stat'ed), or when an image
    cannot be decoded and not ``everything_wanted`` (one warning): the caller then decodes only the images
    it wants, so a bad image outside a subset fails no run, and raises for a bad one among them."""
    entry = folder_cache_entry(root, listing, resize)
    if entry is None:
        return None
    remove_abandoned(entry.parent)
    cached = load_folder_cache(entry, listing, class_names)
    if cached is not None:
        log.info("folder cache: read %s", entry)
        return cached
    try:
        decoded = decode_images([path for files, _ in listing.values() for path in files], resize, workers)
    except DataError as e:
        if everything_wanted:
            raise
        log.warning("folder cache: not written (%s); decoding only the selected images", e)
        return None
    everything: dict[str, np.ndarray] = {}
    start = 0
    for split, (files, _) in listing.items():
        everything[split] = decoded[start : start + len(files)]
        start += len(files)
    arrays = {split: (everything[split], labels) for split, (_, labels) in listing.items()}
    if write_folder_cache(entry, arrays, class_names, root, resize):
        log.info("folder cache: wrote %s", entry)
    return everything
