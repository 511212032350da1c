"""Decoding image files into uint8 RGB arrays in this process: one file (``decode_image``: (32, 32, 3)) or a
list of them in order (``decode_serial``: (N, 32, 32, 3)). Used by ``decode`` and by the decoding processes
(``decode_worker.py``); imports nothing of the package but errors and common."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcifar.errors import DataError
from jaxcifar.sources.common import IMAGE_SIZE


def decode_image(path: Path, resize: bool) -> np.ndarray:
    """Returns one image file as uint8 (32, 32, 3) RGB; other sizes are resized or rejected."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = _as_rgb(image, path)
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                if not resize:
                    raise DataError(
                        f"{path}: image is {image.size[0]}x{image.size[1]}, expected 32x32 "
                        "(pass --resize to resize such images)"
                    )
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(image, np.uint8)
    except Image.DecompressionBombError as e:  # not an OSError: Pillow refuses to decode so many pixels
        raise DataError(
            f"{path}: unreadable image: too many pixels to decode safely ({e.__class__.__name__}: {e}); "
            f"expected {IMAGE_SIZE}x{IMAGE_SIZE} images"
        ) from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: unreadable image ({e.__class__.__name__})") from e


def _as_rgb(image: Any, path: Path) -> Any:
    """Returns a PIL image as 8-bit RGB; 16-bit grayscale (PNG, Pillow mode ``I;16*`` or ``I``) keeps its
    high byte (``value >> 8``), as Pillow reads 16-bit color PNGs. ``convert("RGB")`` alone would clip
    every 16-bit value above 255 to white. Raises DataError for values that are not 8 or 16 bits."""
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise DataError(f"{path}: {image.mode} image with values outside 0..65535; expected 8- or 16-bit images")
        image = Image.fromarray((values >> 8).astype(np.uint8))
    elif image.mode == "F":
        raise DataError(f"{path}: floating-point image (mode F); expected 8- or 16-bit images")
    return image.convert("RGB")


def decode_serial(paths: Sequence[Path], resize: bool) -> np.ndarray:
    """Returns ``decode_image`` of every path, in order, as uint8 (N, 32, 32, 3); raises at the first bad one."""
    images = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, path in enumerate(paths):
        images[i] = decode_image(path, resize)
    return images
