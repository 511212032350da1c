"""Readers that turn each data source into uint8 NHWC arrays, int32 labels and class names.

Every reader returns ``{split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}`` for the splits
``train`` and ``test`` plus the class names. ``jaxcifar.data`` adds subsets and the validation split.
The optional ``select`` callback of the folder reader picks indices before decoding, so a
300-image subset of a 60,000-file tree decodes only 300 files. The folder reader decodes in one
process per CPU and keeps the decoded arrays in a cache (``folder_cache_root()``) that later loads
of the unchanged folder read instead (experiments/data_loading).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jaxcifar.errors import DataError

try:
    import fcntl
except ImportError:  # Windows: no flock; abandoned temporary cache folders go by age only
    fcntl = None  # type: ignore[assignment]

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


def decode_workers() -> int:
    """Returns the number of CPUs this process may use: its CPU affinity where known, else ``os.cpu_count()``."""
    process_cpu_count = getattr(os, "process_cpu_count", None)  # Python >= 3.13
    if process_cpu_count is not None:
        return process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _decode_serial(paths: Sequence[Path], resize: bool) -> np.ndarray:
    """Returns ``decode_image`` of every path, in order, as uint8 (N, 32, 32, 3); raises at the first bad one."""
    images = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, path in enumerate(paths):
        images[i] = decode_image(path, resize)
    return images


def decode_images(paths: Sequence[Path], resize: bool = False, workers: int | None = None) -> np.ndarray:
    """Decodes image files; returns uint8 (N, 32, 32, 3) in the order of ``paths``, equal to ``decode_image`` of each.

    ``workers``: how many processes share the files (this one and ``workers - 1`` others); None means one
    per CPU (``decode_workers()``) and a serial decode below ``PARALLEL_MIN_IMAGES`` images, where starting
    the processes costs more than it saves; 1 decodes in this process only. Processes, not threads:
    decoding a 32x32 JPEG is mostly Python code in Pillow that holds the GIL (experiments/data_loading).
    An unreadable or wrongly sized image raises the same one-line DataError as a serial decode, for the
    same (first) file.
    """
    if workers is None:
        workers = decode_workers() if len(paths) >= PARALLEL_MIN_IMAGES else 1
        workers = max(1, min(workers, len(paths) // PARALLEL_MIN_SHARE))
    workers = min(workers, len(paths))
    if workers <= 1:
        return _decode_serial(paths, resize)
    return _decode_parallel(paths, resize, workers)


PARALLEL_MIN_IMAGES = 4096  # fewer images (auto workers) decode serially: a decoding process takes 0.1-0.8 s to
# start here (the more so the busier the machine), the time of 1,000-6,000 serial decodes
PARALLEL_MIN_SHARE = 1024  # at least this many images per process (auto workers)
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
_DATA_ERROR_EXIT = 3  # a decoding process's exit status after an unreadable image; stdout holds the message
_ORPHANED_EXIT = 4  # a decoding process's exit status when the process that started it has ended
_PARENT_CHECK_EVERY = 256  # images a decoding process decodes between looks at whether its parent still runs
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal this process gets when its parent ends

# A decoding process imports this very package by its location (not by sys.path, which may find another
# copy or none): jaxcifar/__init__.py imports nothing heavy, sources.py numpy and Pillow.
_WORKER_CODE = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("jaxcifar", {init!r}, submodule_search_locations=[{package!r}])
module = importlib.util.module_from_spec(spec)
sys.modules["jaxcifar"] = module
spec.loader.exec_module(module)
from jaxcifar.sources import _decode_worker
_decode_worker({parent})
"""


def _die_with_parent(parent: int) -> None:
    """Makes this (decoding) process end as soon as ``parent``, the process that started it, ends.

    A command ends on Ctrl-C with ``os._exit`` (``jaxcifar.interrupts``) or may be killed: nothing of it runs
    to stop its decoding processes, which would otherwise decode their whole share for nothing. On Linux
    the kernel sends SIGKILL at the parent's end (``PR_SET_PDEATHSIG``, set through ctypes); elsewhere
    ``_decode_worker`` looks at ``os.getppid()`` every ``_PARENT_CHECK_EVERY`` images. Exits at once with
    ``_ORPHANED_EXIT`` when the parent has already ended.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it ended before the line above took effect
        os._exit(_ORPHANED_EXIT)


def _decode_worker(parent: int) -> None:
    """The body of a decoding process started by process ``parent``: reads ``{"resize": bool, "paths":
    [str]}`` (JSON) from stdin.

    Writes the images' raw uint8 bytes (N * 32 * 32 * 3, RGB, row-major) to stdout and exits 0, or writes
    the one-line DataError message of the first unreadable image and exits ``_DATA_ERROR_EXIT``. Ends with
    its parent (``_die_with_parent``).
    """
    _die_with_parent(parent)
    request = json.loads(sys.stdin.buffer.read())
    paths = [Path(p) for p in request["paths"]]
    images = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    try:
        for start in range(0, len(paths), _PARENT_CHECK_EVERY):
            if os.getppid() != parent:
                os._exit(_ORPHANED_EXIT)
            share = slice(start, start + _PARENT_CHECK_EVERY)
            images[share] = _decode_serial(paths[share], bool(request["resize"]))
    except DataError as e:
        sys.stdout.buffer.write(str(e).encode("utf-8", "surrogateescape"))
        sys.stdout.flush()
        sys.exit(_DATA_ERROR_EXIT)
    sys.stdout.buffer.write(images.data)
    sys.stdout.flush()


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    """Kills and reaps the processes that are still running."""
    for process in processes:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            process.wait()


def _decode_parallel(paths: Sequence[Path], resize: bool, workers: int) -> np.ndarray:
    """Decodes ``paths`` in ``workers`` contiguous shares at once; returns uint8 (N, 32, 32, 3).

    The first share decodes in this process, each other one in a Python process of its own started with
    ``subprocess`` (``_decode_worker``), not ``multiprocessing``: its spawn and forkserver workers first
    re-import the parent's ``__main__`` (``python -m jaxcifar.train`` imports jax: seconds per worker), and
    fork copies a multithreaded JAX process. A process that fails for another reason than a bad image
    (killed, cannot start) has its share decoded here, with one warning.
    """
    package = Path(__file__).resolve().parent
    code = _WORKER_CODE.format(init=str(package / "__init__.py"), package=str(package), parent=os.getpid())
    command = [sys.executable, "-P", "-c", code]
    bounds = np.linspace(0, len(paths), workers + 1).astype(int)
    shares = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    images = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    processes: list[subprocess.Popen] = []
    results: list[tuple[bytes, bytes]] = []
    failure = ""
    try:
        for _ in shares[1:]:
            try:
                pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
                processes.append(subprocess.Popen(command, **pipes))
            except (OSError, ValueError) as e:  # no usable interpreter: the shares without a process decode here
                failure = f"cannot start {sys.executable}: {_first_line(e)}"
                break
        with ThreadPoolExecutor(max(1, len(processes))) as pool:  # the threads only feed and drain the pipes
            try:
                futures = [
                    pool.submit(process.communicate, _decode_request(paths[share], resize))
                    for process, share in zip(processes, shares[1:], strict=False)
                ]
                images[shares[0]] = _decode_serial(paths[shares[0]], resize)
                results = [future.result() for future in futures]
            except BaseException:  # a bad image in the first share, Ctrl-C: stop the others now
                _stop(processes)
                raise
    finally:
        _stop(processes)
    warned = False
    for i, share in enumerate(shares[1:]):
        count = share.stop - share.start
        status, out, err = (processes[i].returncode, *results[i]) if i < len(results) else (None, b"", b"")
        if status == 0 and len(out) == count * IMAGE_BYTES:
            images[share] = np.frombuffer(out, np.uint8).reshape(count, IMAGE_SIZE, IMAGE_SIZE, 3)
            continue
        if status == _DATA_ERROR_EXIT:
            raise DataError(out.decode("utf-8", "surrogateescape"))
        if not warned:
            why = err.decode(errors="replace").strip().splitlines()[-1:] or [failure or f"exit status {status}"]
            log.warning("a decoding process failed (%s); decoding its images in this process", why[0][:200])
            warned = True
        images[share] = _decode_serial(paths[share], resize)
    return images


def _decode_request(paths: Sequence[Path], resize: bool) -> bytes:
    """Returns the JSON request that ``_decode_worker`` reads: ``{"resize": bool, "paths": [str]}``."""
    return json.dumps({"resize": resize, "paths": [str(p) for p in paths]}).encode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------------- folder cache

# Bump when the stored layout or the decoding changes: older entries are then ignored (and deleted). 2: 16-bit
# grayscale PNGs keep their high byte (format 1 stored them clipped to white).
FOLDER_CACHE_FORMAT = 2
_STALE_TEMP_SECONDS = 3600  # a hidden temporary entry older than this was left by a killed run


def folder_cache_root() -> Path:
    """Returns the folder that holds decoded image-folder caches: ``default_cache_dir() / "folders"``."""
    return default_cache_dir() / "folders"


def folder_cache_entry(root: Path, listing: dict[str, tuple[list[Path], np.ndarray]], resize: bool) -> Path | None:
    """Returns the cache entry folder for a listed image folder, or None when a listed file cannot be stat'ed.

    Named ``<where>-<what>``: ``where`` hashes the folder's absolute path and ``resize``; ``what`` hashes
    those plus the cache format, the Pillow version and, per file in listing order, its split/class/name,
    size, mtime and ctime (ns), so a changed, added, removed, renamed or touched file (or one replaced by a
    copy that kept size and mtime: its ctime changes) names another entry.
    """
    from PIL import __version__ as pillow_version

    absolute = str(root.resolve())
    where = hashlib.sha256(f"{absolute}\0resize={resize}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
    what = hashlib.sha256(
        f"jaxcifar folder cache {FOLDER_CACHE_FORMAT}\0{absolute}\0resize={resize}\0Pillow {pillow_version}\0".encode(
            "utf-8", "surrogateescape"
        )
    )
    try:
        for split, (files, _) in listing.items():
            lines = []
            for path in files:
                st = os.stat(path)
                lines.append(
                    f"{split}/{path.parent.name}/{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n"
                )
            what.update("".join(lines).encode("utf-8", "surrogateescape"))
    except OSError:
        return None
    return folder_cache_root() / f"{where}-{what.hexdigest()[:16]}"


def load_folder_cache(
    entry: Path, listing: dict[str, tuple[list[Path], np.ndarray]], class_names: list[str]
) -> dict[str, np.ndarray] | None:
    """Returns ``{split: images uint8 (N, 32, 32, 3)}`` from a cache entry, or None when there is none.

    The images are copy-on-write memory maps of the entry's .npy files (writable, changes stay in this
    process). A damaged entry (unreadable or truncated file, wrong shape, labels or class names that do not
    match the listing, a CRC-32 that does not match) logs one warning, is deleted, and gives None.
    """
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta["format"] != FOLDER_CACHE_FORMAT or meta["class_names"] != class_names:
            raise ValueError("its format or class names differ")
        out = {}
        for split, (files, labels) in listing.items():
            images = np.load(entry / f"{split}_images.npy", mmap_mode="c", allow_pickle=False)
            stored = np.load(entry / f"{split}_labels.npy", allow_pickle=False)
            if images.dtype != np.uint8 or images.shape != (len(files), IMAGE_SIZE, IMAGE_SIZE, 3):
                raise ValueError(f"{split} images are {images.dtype} {images.shape}, the folder has {len(files)}")
            if stored.dtype != np.int32 or not np.array_equal(stored, labels):
                raise ValueError(f"{split} labels differ from the folder's")
            if zlib.crc32(images) != meta["crc32"][split]:
                raise ValueError(f"{split} images do not match their CRC-32")
            out[split] = np.asarray(images)  # a plain ndarray view of the map
        return out
    except Exception as e:  # a damaged cache must never fail a run: it is decoded again
        log.warning("ignoring damaged folder cache %s (%s); decoding the images again", entry, _first_line(e))
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Writes ``array`` as a .npy file (no fsync: the entry's CRC-32 catches what a power cut damages)."""
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def write_folder_cache(
    entry: Path, arrays: dict[str, Arrays], class_names: list[str], root: Path, resize: bool
) -> bool:
    """Stores decoded arrays as the cache ``entry``; returns True when the entry exists afterwards.

    Atomic: the files go to a hidden temporary folder beside the entry, which is then renamed, so a killed
    run leaves no entry that loads. The writer holds a lock on that folder (``_lock_folder``): a killed or
    interrupted writer's folder is deleted at the next load (``_remove_abandoned``), a live one's never. Then
    the entries no load can use are deleted (``_remove_stale``). A read-only, full or unusable cache folder
    logs one warning line and returns False (the run goes on without the cache).
    """
    tmp: Path | None = None
    lock: int | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))
        lock = _lock_folder(tmp)
        meta: dict[str, Any] = {
            "format": FOLDER_CACHE_FORMAT,
            "root": str(root.resolve()),
            "resize": resize,
            "class_names": class_names,
            "count": {},
            "crc32": {},
        }
        for split, (images, labels) in arrays.items():
            _save_npy(tmp / f"{split}_images.npy", images)
            _save_npy(tmp / f"{split}_labels.npy", labels)
            meta["count"][split] = len(labels)
            meta["crc32"][split] = zlib.crc32(np.ascontiguousarray(images))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; as readable as the folders mkdir makes
        try:
            os.rename(tmp, entry)
            tmp = None
        except OSError:
            if not entry.is_dir():
                raise
            # another process stored the same entry first
    except OSError as e:
        log.warning(
            "cannot write the folder cache in %s (%s); loading without it (JAXCIFAR_CACHE_DIR sets the cache folder)",
            entry.parent,
            e.strerror or e,
        )
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    _remove_stale(entry)
    return True


def _lock_folder(folder: Path) -> int | None:
    """Takes an exclusive ``flock`` on a new temporary cache folder; returns the descriptor that holds it
    (the lock lasts until it is closed or this process ends, however it ends), or None where folders cannot
    be locked (Windows, some network file systems: their abandoned folders go by age, ``_remove_stale``).

    Taken before anything is written into the folder: a folder with files and no lock holder was abandoned.
    Blocking: ``_remove_abandoned`` holds the lock of an empty folder only for a look at its contents.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_abandoned(cache: Path) -> None:
    """Deletes the hidden temporary folders (``.*.tmp``) in ``cache`` whose writer has ended: killed or
    interrupted mid-write (``os._exit`` on Ctrl-C), it left files in its folder and no lock on it (see
    ``_lock_folder``). A folder whose writer still runs (locked), an empty one (its writer may be about to
    lock it) and one that cannot be locked are left alone; ``_remove_stale`` deletes those an hour old."""
    if fcntl is None:
        return
    try:
        names = [n for n in os.listdir(cache) if n.startswith(".") and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        folder = cache / name
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while the writer holds it
            if os.listdir(folder):
                log.info("folder cache: deleting %s, left by an interrupted write", folder)
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def _remove_stale(entry: Path) -> None:
    """Deletes the cache entries that no load can use any more: the other entries of ``entry``'s folder and
    resize flag (older states of the folder), entries whose folder no longer exists (e.g. a deleted
    temporary copy), and temporary entries of killed runs an hour old (those ``_remove_abandoned`` cannot
    tell: no lock)."""
    where = entry.name.split("-")[0]
    with contextlib.suppress(OSError):
        for other in entry.parent.iterdir():
            if other.name == entry.name:
                continue
            if other.name.startswith("."):
                with contextlib.suppress(OSError):
                    if other.name.endswith(".tmp") and time.time() - other.stat().st_mtime > _STALE_TEMP_SECONDS:
                        shutil.rmtree(other, ignore_errors=True)
            elif other.name.startswith(f"{where}-") or not _cached_folder_exists(other):
                shutil.rmtree(other, ignore_errors=True)


def _cached_folder_exists(entry: Path) -> bool:
    """False when the entry's meta.json names a folder that is gone; True when it exists or is unknown."""
    try:
        return Path(json.loads((entry / "meta.json").read_text())["root"]).is_dir()
    except (OSError, ValueError, KeyError, TypeError):
        return True  # unreadable: left alone (it is replaced when its folder is next loaded)


def read_image_folder(
    root: str | Path,
    select: Select | None = None,
    resize: bool = False,
    dataset: str = "cifar10",
    cache: bool = True,
    workers: int | None = None,
) -> tuple[dict[str, Arrays], list[str]]:
    """Reads an image-folder tree; returns ``({split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}, class_names)``.

    ``select(split, labels) -> indices`` limits what is decoded. ``workers`` processes decode the images
    (``decode_images``; None: one per CPU). With ``cache``, a load that decodes every image stores the
    arrays under ``folder_cache_root()``, and later loads of the unchanged folder (``folder_cache_entry``)
    read them from there, subsets included, instead of decoding. A subset load without a cache decodes
    only its images and stores nothing. ``cache=False`` neither reads nor writes the cache.
    """
    root = Path(root)
    listing, class_names = list_image_folder(root, dataset)
    keep = {
        split: np.arange(len(files)) if select is None else np.asarray(select(split, labels))
        for split, (files, labels) in listing.items()
    }
    whole = {split: np.array_equal(keep[split], np.arange(len(files))) for split, (files, _) in listing.items()}
    entry = folder_cache_entry(root, listing, resize) if cache else None
    if entry is not None:
        _remove_abandoned(entry.parent)
    cached = load_folder_cache(entry, listing, class_names) if entry is not None else None
    out: dict[str, Arrays] = {}
    if cached is not None:
        log.info("folder cache: read %s", entry)
        for split, (_, labels) in listing.items():
            images = cached[split] if whole[split] else cached[split][keep[split]]
            out[split] = (images, labels[keep[split]])
        return out, class_names
    paths = [listing[split][0][k] for split in listing for k in keep[split]]
    decoded = decode_images(paths, resize, workers)
    start = 0
    for split, (_, labels) in listing.items():
        stop = start + len(keep[split])
        out[split] = (decoded[start:stop], labels[keep[split]])
        start = stop
    if entry is not None and all(whole.values()) and write_folder_cache(entry, out, class_names, root, resize):
        log.info("folder cache: wrote %s", entry)
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
