"""Readers that turn each data source into uint8 NHWC arrays, int32 labels and class names.

Every reader returns ``{split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}`` for the splits
``train`` and ``test`` plus the class names. ``jaxcifar.data`` adds subsets and the validation split.

One module per job: ``image_folder`` (train/CLASS/*.jpg trees; ``archive`` unpacks a tar archive of one
into the cache), ``image_file`` (one image file to an array), ``decode`` (many, in one process per CPU running
``decode_worker``),
``cache`` (the decoded-image cache, ``folder_cache_root()``: the first load of a folder decodes all of
it, subset or not, and later loads of the unchanged folder read it; experiments/data_loading),
``cifar_python`` (the official tarball) and ``download`` (fetching it), ``tfds``, ``synthetic``, and
``diagnose`` (what a ``--data-dir`` holds, for one-line errors). The names below are the public ones.
"""

from __future__ import annotations

from jaxcifar.sources.archive import (
    ARCHIVE_SUFFIXES,
    image_folder_in_archive,
    is_image_folder_archive,
    unpack_image_folder_archive,
    unpacked_root,
)
from jaxcifar.sources.cache import (
    FOLDER_CACHE_FORMAT,
    folder_cache_entry,
    folder_cache_root,
    load_folder_cache,
    write_folder_cache,
)
from jaxcifar.sources.cifar_python import read_cifar_python
from jaxcifar.sources.common import (
    CIFAR_PYTHON,
    IMAGE_EXTENSIONS,
    IMAGE_SIZE,
    SPLITS,
    Arrays,
    Select,
    default_cache_dir,
)
from jaxcifar.sources.decode import (
    IMAGE_BYTES,
    PARALLEL_MIN_IMAGES,
    PARALLEL_MIN_SHARE,
    decode_images,
    decode_workers,
)
from jaxcifar.sources.diagnose import (
    EXPECTED_DATA_DIR,
    EXPECTED_FOLDER,
    describe_contents,
    explain_data_dir,
    guess_data_dir,
    has_images,
    is_image_folder_dataset,
    is_tfds_data_dir,
    looks_like_cifar_python,
)
from jaxcifar.sources.download import download_cifar_python, md5sum, verify_md5
from jaxcifar.sources.image_file import decode_image
from jaxcifar.sources.image_folder import list_image_folder, read_image_folder
from jaxcifar.sources.synthetic import make_synthetic
from jaxcifar.sources.tfds import TFDS_CHUNK, read_tfds, read_tfds_split

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CIFAR_PYTHON",
    "EXPECTED_DATA_DIR",
    "EXPECTED_FOLDER",
    "FOLDER_CACHE_FORMAT",
    "IMAGE_BYTES",
    "IMAGE_EXTENSIONS",
    "IMAGE_SIZE",
    "PARALLEL_MIN_IMAGES",
    "PARALLEL_MIN_SHARE",
    "SPLITS",
    "TFDS_CHUNK",
    "Arrays",
    "Select",
    "decode_image",
    "decode_images",
    "decode_workers",
    "default_cache_dir",
    "describe_contents",
    "download_cifar_python",
    "explain_data_dir",
    "folder_cache_entry",
    "folder_cache_root",
    "guess_data_dir",
    "has_images",
    "image_folder_in_archive",
    "is_image_folder_archive",
    "is_image_folder_dataset",
    "is_tfds_data_dir",
    "list_image_folder",
    "load_folder_cache",
    "looks_like_cifar_python",
    "make_synthetic",
    "md5sum",
    "read_cifar_python",
    "read_image_folder",
    "read_tfds",
    "read_tfds_split",
    "unpack_image_folder_archive",
    "unpacked_root",
    "verify_md5",
    "write_folder_cache",
]
