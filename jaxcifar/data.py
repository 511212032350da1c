"""Datasets as host arrays: choose a source, take subsets, carve a stratified validation split.

``load_dataset(config)`` returns a ``Dataset`` whose splits hold uint8 NHWC images and int32
labels. Everything after loading (normalization, augmentation, batching) happens on the device,
see ``jaxcifar.transforms`` and ``jaxcifar.train``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from jaxcifar import sources
from jaxcifar.config import Config
from jaxcifar.errors import DataError
from jaxcifar.files import check_name

log = logging.getLogger(__name__)

# Per-channel statistics of the official training sets, in [0, 1] units. (kuangliu's CIFAR-10 std
# (0.2023, 0.1994, 0.2010) is a known mistake.)
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 (N, 32, 32, 3), ``labels`` int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1:] != (32, 32, 3) or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, 32, 32, 3), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels {self.labels.shape} do not match {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: np.ndarray) -> Split:
        """Returns the split restricted to ``indices``."""
        return Split(self.images[indices], self.labels[indices])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train, optional validation, and test splits plus class names and normalization constants."""

    train: Split
    test: Split
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val: Split | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Returns ``min(n, len(labels))`` sorted indices with class proportions kept (largest remainder)."""
    if n >= len(labels):
        return np.arange(len(labels))
    keep, _ = stratified_split(labels, n / len(labels), seed, exact=n)
    return keep


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, exact: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into (chosen, rest), sorted; ``chosen`` holds ``fraction`` of every class.

    ``exact`` fixes the total chosen count (the per-class rounding remainders go to the classes
    with the largest fractional parts). Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [np.flatnonzero(labels == c) for c in classes]
    quotas = np.array([len(idx) * fraction for idx in per_class])
    counts = np.floor(quotas).astype(int)
    total = exact if exact is not None else round(fraction * len(labels))
    order = np.argsort(-(quotas - counts), kind="stable")
    for i in order[: max(0, total - counts.sum())]:
        counts[i] += 1
    chosen = [rng.permutation(idx)[:k] for idx, k in zip(per_class, counts, strict=True)]
    chosen_idx = np.sort(np.concatenate(chosen)) if chosen else np.array([], int)
    rest = np.setdiff1d(np.arange(len(labels)), chosen_idx)
    return chosen_idx, rest


def resolve_source(config: Config) -> str:
    """Returns the concrete data source for ``config.data_source == 'auto'``.

    Without ``--data-dir``: ``cifar-python`` with ``--download``, else ``tfds``. With ``--data-dir``: what the
    path holds (a cifar python tarball or folder, an image-folder tree with train/ and test/ or a tar archive
    of one, a prepared tfds data folder); anything else raises DataError saying what it holds instead (never a
    fallback to tfds, which would try to build CIFAR into that folder).
    """
    if config.data_source != "auto":
        return config.data_source
    if config.data_dir is None:
        return "cifar-python" if config.download else "tfds"
    path = Path(config.data_dir)
    if not path.exists():
        raise DataError(f"--data-dir {path}: no such file or directory")
    if sources.is_image_folder_archive(path):  # unpacked into the cache by the folder reader
        return "folder"
    if sources.looks_like_cifar_python(path, config.dataset):
        return "cifar-python"
    if sources.is_image_folder_dataset(path):
        return "folder"
    if path.is_dir() and sources.is_tfds_data_dir(path, config.dataset):
        return "tfds"
    raise DataError(sources.explain_data_dir(path, config.dataset))


def check_labels(splits: dict[str, sources.Arrays], class_names: list[str], source: str) -> None:
    """Raises DataError unless every split's labels lie in [0, number of classes).

    Out-of-range labels (a damaged or hand-made file) would otherwise train silently: ``one_hot`` of
    such a label is all zeros.
    """
    n = len(class_names)
    for split, (_, labels) in splits.items():
        bad = labels[(labels < 0) | (labels >= n)]
        if bad.size:
            raise DataError(
                f"{source} {split} labels must be in [0, {n}) for {n} classes; found {bad.size} outside, e.g. {bad[0]}"
            )


def load_dataset(config: Config) -> Dataset:
    """Loads ``config.dataset`` from its source, applies subsets and the validation split.

    Subsets (``train_subset``, ``test_subset``) are stratified samples drawn with ``config.seed``;
    the validation split is carved from the (subset) training split with the same seed.
    """
    if config.data_dir is not None:
        check_name(config.data_dir, "--data-dir", utf8=False)
    source = resolve_source(config)
    subset = {"train": config.train_subset, "test": config.test_subset}

    def select(split: str, labels: np.ndarray) -> np.ndarray:
        n = subset[split]
        return np.arange(len(labels)) if n is None else stratified_subset(labels, n, config.seed)

    if source == "folder":  # subsets come from the cached whole folder (Config requires data_dir with folder)
        arrays, class_names = sources.read_image_folder(
            config.data_dir, select=select, resize=config.resize, dataset=config.dataset, cache=config.folder_cache
        )
        splits = {name: Split(*pair) for name, pair in arrays.items()}
    else:
        if source == "synthetic":
            arrays, class_names = sources.make_synthetic(num_classes=config.num_classes, seed=config.seed)
        elif source == "cifar-python":
            path = config.data_dir
            if path is None:
                if not config.download:
                    raise DataError("--data-source cifar-python needs --data-dir PATH or --download")
                path = sources.download_cifar_python(config.dataset)
            arrays, class_names = sources.read_cifar_python(path, config.dataset)
        else:
            arrays, class_names = sources.read_tfds(config.dataset, config.data_dir)
        check_labels(arrays, class_names, source)
        splits: dict[str, Split] = {}
        for name, pair in arrays.items():
            split = Split(*pair)
            splits[name] = split if subset.get(name) is None else split.take(select(name, split.labels))

    if len(class_names) != config.num_classes:
        raise DataError(f"{source} data has {len(class_names)} classes, {config.dataset} has {config.num_classes}")
    train, test = splits["train"], splits["test"]
    val = None
    if config.val_fraction > 0:
        val_idx, train_idx = stratified_split(train.labels, config.val_fraction, config.seed + 1)
        if len(val_idx) == 0:
            raise DataError(f"--val-fraction {config.val_fraction} leaves no validation images")
        train, val = train.take(train_idx), train.take(val_idx)
    if len(train) < config.batch_size:
        raise DataError(
            f"--batch-size {config.batch_size} is larger than the {len(train)} training images (the last partial "
            "batch is dropped, so an epoch would be empty)"
        )
    mean, std = NORMALIZATION[config.dataset]
    log.info("data: %s, train %d, val %d, test %d", source, len(train), len(val) if val else 0, len(test))
    return Dataset(train=train, val=val, test=test, class_names=tuple(class_names), mean=mean, std=std)
