"""The program of a decoding process: ``python -P .../jaxcifar/sources/decode_worker.py PARENT_PID``.

``decode.decode_images`` starts one per extra CPU (``command``) and sends it ``{"resize": bool, "paths":
[str]}`` (JSON) on stdin; the process writes the images' raw uint8 bytes (N * 32 * 32 * 3, RGB, row-major)
to stdout and exits 0, or writes the one-line DataError message of the first unreadable image and exits
``DATA_ERROR_EXIT``. It ends with the process that started it (``die_with_parent``).

Run as a file, not with ``-m``: ``-m`` finds ``jaxcifar`` on ``sys.path``, which may hold another copy or
none, so the process imports this very package by its location (``import_package_from``). Only the
standard library and numpy are imported before that; ``jaxcifar/__init__.py`` imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

DATA_ERROR_EXIT = 3  # exit status after an unreadable image; stdout holds the message
ORPHANED_EXIT = 4  # exit status when the process that started it has ended
PARENT_CHECK_EVERY = 256  # images decoded between looks at whether the parent still runs
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal this process gets when its parent ends


def command(parent: int) -> list[str]:
    """Returns the argv that starts a decoding process for the process ``parent`` (this interpreter, ``-P``:
    nothing of the working directory on ``sys.path``)."""
    return [sys.executable, "-P", str(Path(__file__).resolve()), str(parent)]


def die_with_parent(parent: int) -> None:
    """Makes this (decoding) process end as soon as ``parent``, the process that started it, ends.

    A command ends on Ctrl-C with ``os._exit`` (``jaxcifar.interrupts``) or may be killed: nothing of it runs
    to stop its decoding processes, which would otherwise decode their whole share for nothing. On Linux
    the kernel sends SIGKILL at the parent's end (``PR_SET_PDEATHSIG``, set through ctypes); elsewhere
    ``serve`` looks at ``os.getppid()`` every ``PARENT_CHECK_EVERY`` images. Exits at once with
    ``ORPHANED_EXIT`` when the parent has already ended.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it ended before the line above took effect
        os._exit(ORPHANED_EXIT)


def serve(parent: int) -> None:
    """Decodes the request on stdin for the process ``parent``; writes the images' bytes to stdout, or the
    message of the first unreadable image and exits ``DATA_ERROR_EXIT``."""
    import numpy as np

    from jaxcifar.errors import DataError
    from jaxcifar.sources.common import IMAGE_SIZE
    from jaxcifar.sources.image_file import decode_serial

    request = json.loads(sys.stdin.buffer.read())
    paths = [Path(p) for p in request["paths"]]
    images = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    try:
        for start in range(0, len(paths), PARENT_CHECK_EVERY):
            if os.getppid() != parent:
                os._exit(ORPHANED_EXIT)
            share = slice(start, start + PARENT_CHECK_EVERY)
            images[share] = decode_serial(paths[share], bool(request["resize"]))
    except DataError as e:
        sys.stdout.buffer.write(str(e).encode("utf-8", "surrogateescape"))
        sys.stdout.flush()
        sys.exit(DATA_ERROR_EXIT)
    sys.stdout.buffer.write(images.data)
    sys.stdout.flush()


def import_package_from(package: Path) -> None:
    """Imports ``jaxcifar`` from the folder ``package`` (its ``__init__.py``), whatever ``sys.path`` holds."""
    spec = importlib.util.spec_from_file_location(
        "jaxcifar", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["jaxcifar"] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    _parent = int(sys.argv[1])
    die_with_parent(_parent)
    import_package_from(Path(__file__).resolve().parent.parent)
    serve(_parent)
