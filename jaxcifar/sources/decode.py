"""Decoding many image files into a uint8 (N, 32, 32, 3) array, shared between this process and one decoding
process per other CPU (``decode_images``; the processes run ``decode_worker.py``, which decodes with
``image_file.decode_serial`` as this process does)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jaxcifar.errors import DataError
from jaxcifar.sources import decode_worker
from jaxcifar.sources.common import IMAGE_SIZE, first_line
from jaxcifar.sources.image_file import decode_serial

log = logging.getLogger(__name__)


def decode_workers() -> int:
    """Returns the number of CPUs this process may use: its CPU affinity where known, else ``os.cpu_count()``."""
    process_cpu_count = getattr(os, "process_cpu_count", None)  # Python >= 3.13
    if process_cpu_count is not None:
        return process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


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
        return decode_serial(paths, resize)
    return _decode_parallel(paths, resize, workers)


PARALLEL_MIN_IMAGES = 4096  # fewer images (auto workers) decode serially: a decoding process takes 0.1-0.8 s to
# start here (the more so the busier the machine), the time of 1,000-6,000 serial decodes
PARALLEL_MIN_SHARE = 1024  # at least this many images per process (auto workers)
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3


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
    ``subprocess`` (``decode_worker.py``), not ``multiprocessing``: its spawn and forkserver workers first
    re-import the parent's ``__main__`` (``python -m jaxcifar.train`` imports jax: seconds per worker), and
    fork copies a multithreaded JAX process. A process that fails for another reason than a bad image
    (killed, cannot start) has its share decoded here, with one warning.
    """
    command = decode_worker.command(os.getpid())
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
                failure = f"cannot start {sys.executable}: {first_line(e)}"
                break
        with ThreadPoolExecutor(max(1, len(processes))) as pool:  # the threads only feed and drain the pipes
            try:
                futures = [
                    pool.submit(process.communicate, _decode_request(paths[share], resize))
                    for process, share in zip(processes, shares[1:], strict=False)
                ]
                images[shares[0]] = decode_serial(paths[shares[0]], resize)
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
        if status == decode_worker.DATA_ERROR_EXIT:
            raise DataError(out.decode("utf-8", "surrogateescape"))
        if not warned:
            why = err.decode(errors="replace").strip().splitlines()[-1:] or [failure or f"exit status {status}"]
            log.warning("a decoding process failed (%s); decoding its images in this process", why[0][:200])
            warned = True
        images[share] = decode_serial(paths[share], resize)
    return images


def _decode_request(paths: Sequence[Path], resize: bool) -> bytes:
    """Returns the JSON request that ``decode_worker.serve`` reads: ``{"resize": bool, "paths": [str]}``."""
    return json.dumps({"resize": resize, "paths": [str(p) for p in paths]}).encode("utf-8", "surrogateescape")
