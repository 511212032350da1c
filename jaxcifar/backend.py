"""Per-platform compile and execution policy: the one place that asks which devices a run has.

- ``conv_general_dilated(impl, devices, model)``: the convolution primitive handed to the model
  (``Config.conv_impl``): ``"lax"`` (XLA's convolution and gradients), ``"matmul"`` (the custom VJP of
  ``jaxcifar.models.conv`` everywhere), ``"auto"`` (the custom VJP where it was measured faster on one
  CPU device, except for a model whose class says ``cpu_auto_conv = "lax"``; XLA's own on GPU, TPU and several
  devices).
- ``compiler_options()``: XLA flags for functions that run a model (on CPU, convolutions go to XLA's
  Eigen kernels instead of YNNPACK); ``lazy_jit`` applies them to module-level functions.
- ``eval_chunk(devices)``: eval-mode forwards on one CPU device run in chunks.
- ``enable_compile_cache(directory)``: JAX's persistent compilation cache (``--compile-cache``), its
  truncated entries replaced (``repair_compile_cache``).

Every threshold here was measured on the 2-core CPU this project is developed on (jaxlib 0.10);
the figures are in ``experiments/cpu_conv/README.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from jax import lax

from jaxcifar.errors import RunFileError
from jaxcifar.files import write_json
from jaxcifar.models import cpu_auto_conv
from jaxcifar.models.conv import PATCH_BLOCK_BYTES, CustomGradConv
from jaxcifar.names import CONV_IMPLS

log = logging.getLogger(__name__)

XLA_CPU_CONVOLUTIONS = ("eigen", "ynnpack")

# "auto" on one CPU device keeps XLA's gradients for convolutions (other than 1x1) below this many
# forward FLOPs per call, and for stride-1 ones with at most AUTO_MIN_OUT_PIXELS output pixels.
AUTO_MIN_FLOPS = 2.5e8
AUTO_MIN_OUT_PIXELS = 8 * 8

# Eval-mode forwards on one CPU device run over chunks of at most this many images (``jax.lax.map``).
CPU_EVAL_CHUNK = 128


def _devices(devices: Sequence[Any] | None) -> list[Any]:
    return list(devices) if devices is not None else jax.devices()


def is_single_cpu(devices: Sequence[Any] | None = None) -> bool:
    """Returns whether ``devices`` (default: all of this process's view) is one CPU device."""
    devices = _devices(devices)
    return len(devices) == 1 and devices[0].platform == "cpu"


def conv_general_dilated(
    impl: str = "auto", devices: Sequence[Any] | None = None, model: str | None = None
) -> Callable[..., Any]:
    """Returns the convolution primitive (``lax.conv_general_dilated``'s signature) for ``impl`` on
    ``devices`` (default: ``jax.devices()``), to pass to the model named ``model`` (None: any model; under
    ``"auto"`` a model's ``cpu_auto_conv``, ``models.cpu_auto_conv``, can choose XLA's gradients on one CPU).
    Raises ValueError for an unknown ``impl`` or ``model``."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv implementation {impl!r}; expected one of: {', '.join(CONV_IMPLS)}")
    devices = _devices(devices)
    per_model = model is not None and cpu_auto_conv(model) == "lax"  # the model's own choice (its class)
    if impl == "lax" or (impl == "auto" and (not is_single_cpu(devices) or per_model)):
        return lax.conv_general_dilated
    # With several devices the batch may be sharded: one weight-gradient matmul, no loop of collectives.
    block_bytes = PATCH_BLOCK_BYTES if len(devices) == 1 else None
    if impl == "matmul":
        return CustomGradConv(block_bytes=block_bytes)
    return CustomGradConv(min_flops=AUTO_MIN_FLOPS, min_out_pixels=AUTO_MIN_OUT_PIXELS, block_bytes=block_bytes)


def describe_conv(impl: str = "auto", devices: Sequence[Any] | None = None, model: str | None = None) -> str:
    """Returns what ``impl`` runs on ``devices`` for ``model``: ``"lax"``, ``"matmul"``, or ``"auto: ..."`` in words."""
    chosen = conv_general_dilated(impl, devices, model)
    if impl != "auto":
        return impl
    if chosen is lax.conv_general_dilated:
        return "auto: lax"
    return (
        "auto: matmul weight gradient for 1x1, strided and larger-than-8x8 3x3 convolutions, "
        "polyphase input gradient for strided ones, lax for the rest"
    )


def compiler_options(cpu_convolutions: str = "eigen", platform: str | None = None) -> dict[str, str]:
    """Returns the XLA compiler options for functions that run a model on ``platform`` (default: JAX's
    default backend): ``{}`` off CPU. On CPU, ``cpu_convolutions="eigen"`` keeps YNNPACK for dots and
    reductions and gives convolutions to XLA's Eigen kernels (YNNPACK ran 64-channel convolutions on
    one thread); ``"ynnpack"`` returns ``{}``, XLA's default, for comparison."""
    if cpu_convolutions not in XLA_CPU_CONVOLUTIONS:
        raise ValueError(f"cpu_convolutions={cpu_convolutions!r}; expected one of: {', '.join(XLA_CPU_CONVOLUTIONS)}")
    if (platform or jax.default_backend()) != "cpu" or cpu_convolutions == "ynnpack":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def enable_compile_cache(directory: str | Path) -> Path | None:
    """Turns on JAX's persistent compilation cache in ``directory`` (created if needed), so that a
    re-run of the same configuration loads its compiled steps from disk instead of compiling them.
    Keeps a cache directory the user already set (``JAX_COMPILATION_CACHE_DIR``). Deletes the cache's
    truncated entries first (``repair_compile_cache``). Returns the cache directory in use, or None when
    ``directory`` cannot be created (the run goes on without a cache)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        repair_compile_cache(current)
        return Path(current)
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: no compilation cache: cannot create {path} ({e.strerror or e})", flush=True)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    repair_compile_cache(path)
    return path


COMPILE_CACHE_CHECKED = ".jaxcifar-checked.json"  # {entry file name: [size, mtime_ns]} of entries found intact


def repair_compile_cache(directory: str | Path) -> list[Path]:
    """Deletes the entries of JAX's persistent compilation cache in ``directory`` that do not decompress (a
    write cut short by a full disk, ``ulimit -f`` or a kill); returns their paths.

    JAX (0.10 to 0.12, ``LRUCache.put``) writes an entry in place and never over an existing one, so a
    truncated entry made every later run warn ("Error reading persistent compilation cache entry") and
    compile again; deleted, it is written anew by the next compile. Each entry is decompressed once: the
    size and mtime of the intact ones are kept in ``directory/COMPILE_CACHE_CHECKED``. An entry being
    written by another process at that moment may be deleted too (it is then compiled again). Remote
    caches (``gs://...``) and JAX versions without ``decompress_executable`` are left alone.
    """
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:
        return []
    if "://" in str(directory):
        return []
    folder = Path(directory)
    memo = folder / COMPILE_CACHE_CHECKED
    try:
        checked = json.loads(memo.read_text())
    except (OSError, ValueError):
        checked = {}
    checked = checked if isinstance(checked, dict) else {}
    try:
        entries = [e for e in os.scandir(folder) if e.name.endswith("-cache") and e.is_file()]
    except OSError:
        return []
    intact: dict[str, list[int]] = {}
    removed: list[Path] = []
    for entry in entries:
        try:
            stat = entry.stat()
            stamp = [stat.st_size, stat.st_mtime_ns]
            if checked.get(entry.name) != stamp:
                blob = Path(entry.path).read_bytes()
        except OSError:
            continue
        if checked.get(entry.name) != stamp:
            try:
                decompress_executable(blob)
            except Exception:  # zlib.error, zstandard's or compression.zstd's errors: what JAX's read would raise
                for path in (Path(entry.path), folder / (entry.name.removesuffix("-cache") + "-atime")):
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed.append(Path(entry.path))
                continue
        intact[entry.name] = stamp
    if intact != checked:
        with contextlib.suppress(RunFileError):  # a read-only cache: checked again next time
            write_json(memo, intact)
    if removed:
        log.warning(
            "compile cache: deleted %d truncated entr%s in %s (a write cut short); %s again",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            folder,
            "its function compiles" if len(removed) == 1 else "their functions compile",
        )
    return removed


def lazy_jit(fun: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """Returns ``fun`` jitted with ``compiler_options()`` (and ``jit_kwargs``), built on the first call.

    For module-level functions (usable as a decorator via ``functools.partial``): choosing the
    options at import time would initialize the JAX backend on ``import``, before a user could
    call ``jax.distributed.initialize()``.
    """
    jitted = None

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)
        return jitted(*args, **kwargs)

    return call


def eval_chunk(devices: Sequence[Any] | None = None) -> int | None:
    """Returns the eval forward chunk size: ``CPU_EVAL_CHUNK`` when eval runs on one CPU device, else
    None (the whole batch at once). Train steps are never chunked (BatchNorm's batch statistics)."""
    return CPU_EVAL_CHUNK if is_single_cpu(devices) else None
