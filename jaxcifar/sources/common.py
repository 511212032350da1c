"""What the readers share: the image size, the split names, the array types, the official releases'
table, the cache folder and the one-line form of an exception."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

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
    """Returns ``$JAXCIFAR_CACHE_DIR`` (when set and not empty) or ``~/.cache/jaxcifar``."""
    return Path(os.environ.get("JAXCIFAR_CACHE_DIR") or Path.home() / ".cache" / "jaxcifar")


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 120 characters)."""
    text = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
    return f"{error.__class__.__name__}: {text}" if text else error.__class__.__name__
