"""Times loading the full CIFAR-10 image folder (60,000 JPEGs): serial decode before the change, serial,
thread-pool and process decode now, and the first and second load with the decoded cache.

    python experiments/data_loading/run.py [--data-dir DIR] [--repeats 3] > experiments/data_loading/output.txt

Without ``--data-dir`` it unpacks ../shared/data/cifar10-jpeg.tar.gz into a temporary folder (deleted at the
end). The cache goes to a fresh temporary ``JAXCIFAR_CACHE_DIR``, so the first load is a real first load.
"Before" is ``read_image_folder`` of ``jaxcifar/sources.py`` at commit dae0d4c (read with ``git show``,
loaded as a module beside ``jaxcifar.sources``). Every way of decoding must give the same arrays, bit for
bit (checked). The machine is shared: ``/proc/loadavg`` is printed before and after, and with each figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import jaxcifar  # noqa: E402
from jaxcifar import sources  # noqa: E402

BEFORE_COMMIT = "dae0d4c"  # the last commit with the serial, uncached folder reader
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def loadavg() -> str:
    """Returns the 1-, 5- and 15-minute load averages, e.g. ``'2.10 1.90 1.70'``."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Returns (seconds, result) of ``fn()``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def old_sources() -> ModuleType:
    """Returns ``jaxcifar/sources.py`` of BEFORE_COMMIT as a module (``jaxcifar.sources_before``)."""
    text = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BEFORE_COMMIT}:jaxcifar/sources.py"], capture_output=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="sources-before-")) / "sources_before.py"
    path.write_bytes(text)
    spec = importlib.util.spec_from_file_location("jaxcifar.sources_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(root: Path) -> jaxcifar.Dataset:
    """Returns ``jaxcifar.load_dataset`` of the folder (default Config: the cache on)."""
    return jaxcifar.load_dataset(jaxcifar.Config(data_source="folder", data_dir=str(root)))


def read(reader: Callable[..., tuple[dict[str, sources.Arrays], list[str]]], root: Path, **kwargs: object) -> tuple:
    """Returns (images uint8 (60000, 32, 32, 3), labels int32 (60000,)) of ``reader(root, **kwargs)``: train, test."""
    arrays, _ = reader(root, **kwargs)
    return tuple(np.concatenate([arrays["train"][i], arrays["test"][i]]) for i in (0, 1))


def stacked(dataset: jaxcifar.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (60000, 32, 32, 3), labels int32 (60000,)): train then test."""
    return (
        np.concatenate([dataset.train.images, dataset.test.images]),
        np.concatenate([dataset.train.labels, dataset.test.labels]),
    )


def threads_decode(paths: list[Path]) -> np.ndarray:
    """Returns uint8 (N, 32, 32, 3): ``decode_image`` of every path on a thread pool of os.cpu_count() threads."""
    images = np.empty((len(paths), 32, 32, 3), np.uint8)

    def one(i: int) -> None:
        images[i] = sources.decode_image(paths[i], False)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, range(len(paths)), chunksize=256))
    return images


def start_seconds(code: str) -> float:
    """Returns the wall seconds of ``python -P -c code`` (a worker start-up)."""
    return timed(lambda: subprocess.run([sys.executable, "-P", "-c", code], check=True, cwd=REPO))[0]


def cpu_seconds() -> float:
    """Returns the CPU seconds (user + system) used so far by this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    """Prints the figures, one line each, then a summary (best and median of the rounds)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, help="the folder holding train/ and test/ (default: unpack the archive)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement, interleaved")
    args = parser.parse_args()
    print(f"load before: {loadavg()} (the machine is shared with other jobs: every figure depends on the load)")
    cpus = f"os.cpu_count() {os.cpu_count()}, decode_workers() {sources.decode_workers()}"
    print(f"machine: {platform.machine()}, {cpus}, Python {platform.python_version()}, numpy {np.__version__}")
    scratch = Path(tempfile.mkdtemp(prefix="jaxcifar-data-loading-"))
    cache = scratch / "cache"
    os.environ["JAXCIFAR_CACHE_DIR"] = str(cache)
    try:
        root = args.data_dir
        if root is None:
            seconds, _ = timed(lambda: tarfile.open(ARCHIVE).extractall(scratch / "data", filter="data"))
            root = next(p.parent for p in (scratch / "data").rglob("train") if p.is_dir())
            print(
                f"unpacked {ARCHIVE.name} into a temporary folder in {seconds:.1f}s (its files stay in the page cache)"
            )
        listing, _ = sources.list_image_folder(root)
        paths = listing["train"][0] + listing["test"][0]
        print(f"data: {root} (temporary when unpacked here), {len(paths)} images")

        package = Path(sources.__file__).resolve().parent.parent  # what decode_worker.py imports before it decodes
        worker = (
            "import importlib.util, pathlib\n"
            f"spec = importlib.util.spec_from_file_location('w', {str(package / 'sources' / 'decode_worker.py')!r})\n"
            "worker = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(worker)\n"
            f"worker.import_package_from(pathlib.Path({str(package)!r}))\n"
            "import jaxcifar.sources\n"
        )
        print(f"start-up of one decoding process (python + jaxcifar.sources): {start_seconds(worker):.2f}s")
        print(
            "start-up of python + import jaxcifar.train (what a multiprocessing spawn/forkserver worker imports "
            f"first under python -m jaxcifar.train): {start_seconds('import jaxcifar.train'):.2f}s"
        )

        before = old_sources()
        workers = sources.decode_workers()
        ways: list[tuple[str, Callable[[], tuple]]] = [
            (
                f"before ({BEFORE_COMMIT}) read_image_folder: serial decode",
                lambda: read(before.read_image_folder, root),
            ),
            (
                "read_image_folder(cache=False, workers=1): serial",
                lambda: read(sources.read_image_folder, root, cache=False, workers=1),
            ),
            (f"thread pool of decode_image, {os.cpu_count()} threads (not used)", lambda: (threads_decode(paths),)),
            (
                f"read_image_folder(cache=False): {workers} processes",
                lambda: read(sources.read_image_folder, root, cache=False),
            ),
            ("first load_dataset: processes + write the cache", lambda: stacked(load(root))),
            ("second load_dataset: read the cache", lambda: stacked(load(root))),
        ]
        walls: dict[str, list[float]] = {name: [] for name, _ in ways}
        reference: tuple | None = None
        for r in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            for name, way in ways:
                cpu = cpu_seconds()
                seconds, result = timed(way)
                cpu = cpu_seconds() - cpu
                reference = reference or result
                assert all(np.array_equal(a, b) for a, b in zip(result, reference, strict=False)), name
                walls[name].append(seconds)
                print(
                    f"round {r + 1}  {name:<58} {seconds:6.2f}s wall, {cpu:6.2f}s CPU, "
                    f"{len(paths) / seconds:7,.0f} images/s  [load {loadavg()}]"
                )
        (entry,) = (cache / "folders").iterdir()
        size = sum(f.stat().st_size for f in entry.iterdir()) / 1e6
        print(f"cache entry: {size:.0f} MB in {len(list(entry.iterdir()))} files")
        print("bit for bit: every way above gave the same images and labels as the serial decode before")
        seconds, (listing, names) = timed(lambda: sources.list_image_folder(root))
        print(f"second load, its parts: list_image_folder {seconds:.2f}s", end="")
        seconds, entry = timed(lambda: sources.folder_cache_entry(root, listing, False))
        print(f", folder_cache_entry (stat every file, hash) {seconds:.2f}s", end="")
        seconds, _ = timed(lambda: sources.load_folder_cache(entry, listing, names))
        print(f", load_folder_cache (map the .npy files, CRC-32) {seconds:.2f}s")
        print(f"summary over {args.rounds} rounds (wall seconds, best / median):")
        for name, values in walls.items():
            print(f"  {name:<58} {min(values):6.2f} / {statistics.median(values):6.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load after: {loadavg()}")


if __name__ == "__main__":
    main()
