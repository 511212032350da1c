"""``python -m jaxcifar.bench``: speed of the jitted train and eval steps, optionally against PyTorch.

Builds the model and optimizer as training does (``models.get_model``, ``jaxcifar.optim``,
``jaxcifar.state.create_train_state``), compiles ``jaxcifar.steps.make_train_step`` (on-device
crop-flip augmentation, normalization, forward, backward, SGD update) and ``make_eval_step``
ahead of time on one random uint8 batch, runs ``--warmup`` steps, then times ``--steps`` steps one
by one (each waits for its result). It reports per step the median wall time, images/s, the CPU
time of this process (stable when other programs share the machine; about cores x wall time when
they don't), the compile time and the achieved GFLOP/s.

FLOPs are counted analytically, not measured: 2 per multiply-add of every convolution and dense
layer (BatchNorm, activations and the optimizer, under 1% together, are left out). Forward = the
eval step; train step = 3 x forward (forward, input gradient, weight gradient) minus the first
layer's input gradient, which is not computed.

MFU (model FLOP utilization) = achieved FLOP/s (this analytic count) / the device's dense peak for the
compute dtype, from ``PEAKS`` (vendor datasheets, matched on the device kind); None where the device is
not in the table (every CPU).

``--compare-torch`` times a PyTorch model of the same architecture (``jaxcifar.torch_fast`` for resnet9 and
airbench; ``jaxcifar.torch_resnet``:
kuangliu/pytorch-cifar's ResNet, same widths, batch, dtype via autocast, same thread count) on the same
images in this process, doing what the jax steps do (``TORCH_STEPS``): the uint8 batch lives on the
device, the train step crops and flips it per image there, normalizes, runs forward, backward and SGD.
It runs on the GPU (``cuda``) when JAX does and ``torch.cuda.is_available()``, else on the CPU
(``--torch-device`` forces one); the code is the same for both, with the device as a variable and
``torch.cuda.synchronize`` ending every timed step on CUDA. Eager by default, in both memory formats
(the faster one is reported); ``--torch-compile`` wraps the model in ``torch.compile`` (channels_last
only) and reports its compile time apart. PyTorch is optional and imported only then.
"""

from __future__ import annotations

from jaxcifar import interrupts

if __name__ == "__main__":  # first, before the heavy imports below: Ctrl-C ends in one line from the start
    interrupts.install("python -m jaxcifar.bench")

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcifar import backend, cli, models, network, optim, sizing, steps, torch_fast, torch_resnet
from jaxcifar.config import DTYPES, Config
from jaxcifar.data import NORMALIZATION
from jaxcifar.errors import DataError
from jaxcifar.models.conv import flops as conv_flops
from jaxcifar.state import create_train_state

PROG = "python -m jaxcifar.bench"
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
FLOPS_METHOD = (
    "analytic: 2 x multiply-adds of convolutions and dense layers; train = 3 x forward - first layer's input gradient"
)
AUGMENT = "crop-flip"  # the train step's augmentation, on both sides of --compare-torch
CROP_PADDING = 4  # transforms.random_crop's default
TORCH_STEPS = {
    "train": "uint8 batch on the device -> per-image random crop (4-px zero padding) and flip on the device -> "
    "normalize -> forward -> cross-entropy -> backward -> SGD (Nesterov momentum, weight decay)",
    "eval": "uint8 batch on the device -> normalize -> eval-mode forward -> summed cross-entropy and correct count",
}
TORCH_DEVICES = ("auto", "cpu", "cuda")
MAX_COMPILE_CALLS = 5  # --torch-compile: calls until one compiles nothing new (at most this many)


@dataclasses.dataclass(frozen=True)
class Peak:
    """Dense (no 2:4 sparsity) peak FLOP/s of one accelerator per math mode; None = no such mode.

    ``float32`` is true FP32 arithmetic (NVIDIA's CUDA cores), ``tf32`` NVIDIA's TF32 tensor cores.
    ``float32_default`` names the field that float32 convolutions and matmuls run at under JAX's default
    precision (``jax_default_matmul_precision`` unset): ``"tf32"`` on NVIDIA Ampere and newer, ``"float32"``
    on V100 and T4 (no TF32), ``"bfloat16"`` on TPUs (one bfloat16 pass). See the JAX docs, "Matmul
    precision": "float32 dot products may be computed with reduced-precision arithmetic internally
    (bfloat16 on TPU, TF32 on recent GPUs)"; PyTorch's default agrees for convolutions
    (``torch.backends.cudnn.allow_tf32`` is True), which are all but 0.01 % of these models' FLOPs.
    Measured agreement: jaxcifar's float32 ResNet18 train step ran at 126 TFLOP/s on an H200
    (experiments/resnet18_onecycle_20ep/h200/), above the H200's 67 TFLOP/s FP32 peak, so it was not FP32.
    """

    name: str
    pattern: str  # regular expression searched (case-insensitively) in the device kind
    float32: float | None
    tf32: float | None
    bfloat16: float | None
    float16: float | None
    float32_default: str
    source: str


TERA = 1e12
# Values in FLOP/s. First match wins: the more specific patterns (PCIe, NVL, V100S) come before the general ones.
# NVIDIA datasheets give tensor-core figures "with sparsity"; the dense peak is half of them.
PEAKS: tuple[Peak, ...] = (
    # NVIDIA H100 datasheet: H100 PCIe FP32 51, TF32 756*, BF16 1,513*, FP16 1,513* TFLOPS (* with sparsity).
    Peak("NVIDIA H100 PCIe", r"\bH100 PCIe\b", 51e12, 378e12, 756.5e12, 756.5e12, "tf32", "NVIDIA H100 datasheet"),
    # NVIDIA H100 datasheet: H100 NVL FP32 60, TF32 835*, BF16 1,671*, FP16 1,671*.
    Peak("NVIDIA H100 NVL", r"\bH100 NVL\b", 60e12, 417.5e12, 835.5e12, 835.5e12, "tf32", "NVIDIA H100 datasheet"),
    # NVIDIA H100 datasheet: H100 SXM FP32 67, TF32 989*, BF16 1,979*, FP16 1,979*; device kind
    # "NVIDIA H100 80GB HBM3".
    Peak("NVIDIA H100 SXM", r"\bH100\b", 67e12, 494.5e12, 989.5e12, 989.5e12, "tf32", "NVIDIA H100 datasheet"),
    # NVIDIA H200 datasheet: H200 NVL FP32 60, TF32 835*, BF16 1,671*, FP16 1,671*.
    Peak("NVIDIA H200 NVL", r"\bH200 NVL\b", 60e12, 417.5e12, 835.5e12, 835.5e12, "tf32", "NVIDIA H200 datasheet"),
    # NVIDIA H200 datasheet: H200 SXM FP32 67, TF32 989*, BF16 1,979*, FP16 1,979*; device kind "NVIDIA H200".
    Peak("NVIDIA H200 SXM", r"\bH200\b", 67e12, 494.5e12, 989.5e12, 989.5e12, "tf32", "NVIDIA H200 datasheet"),
    # NVIDIA A100 datasheet (SXM and PCIe, 40 and 80 GB alike): FP32 19.5, TF32 156, BF16 312, FP16 312
    # (dense; 312/624/624 with sparsity).
    Peak("NVIDIA A100", r"\bA100\b", 19.5e12, 156e12, 312e12, 312e12, "tf32", "NVIDIA A100 datasheet"),
    # NVIDIA L4 datasheet: FP32 30.3, TF32 120*, BF16 242*, FP16 242*. \b keeps L40/L40S out.
    Peak("NVIDIA L4", r"\bL4\b", 30.3e12, 60e12, 121e12, 121e12, "tf32", "NVIDIA L4 datasheet"),
    # NVIDIA T4 datasheet: FP32 8.1, mixed precision (FP16/FP32) 65 TFLOPS; no TF32 or bfloat16 tensor cores.
    Peak("NVIDIA T4", r"\bT4\b", 8.1e12, None, None, 65e12, "float32", "NVIDIA T4 datasheet"),
    # NVIDIA V100 datasheet: V100S PCIe FP32 16.4, tensor (FP16) 130; V100 PCIe 14 / 112; V100 SXM2 15.7 / 125.
    Peak("NVIDIA V100S PCIe", r"\bV100S\b", 16.4e12, None, None, 130e12, "float32", "NVIDIA V100 datasheet"),
    Peak("NVIDIA V100 PCIe", r"\bV100-PCIE", 14e12, None, None, 112e12, "float32", "NVIDIA V100 datasheet"),
    Peak("NVIDIA V100 SXM2", r"\bV100\b", 15.7e12, None, None, 125e12, "float32", "NVIDIA V100 datasheet"),
    # Google Cloud TPU documentation (system architecture, per chip, bfloat16): v4 275, v5e 197, v5p 459,
    # v6e 918 TFLOPS. JAX's device kinds: "TPU v4", "TPU v5 lite" (v5e), "TPU v5" (v5p), "TPU v6 lite" (v6e);
    # "TPU v4 lite" (v4i) is another chip and matches nothing.
    Peak("TPU v4", r"\bTPU v4$", None, None, 275e12, None, "bfloat16", "Google Cloud TPU v4 documentation"),
    Peak(
        "TPU v5e", r"\bTPU v5 ?(lite|e)\b", None, None, 197e12, None, "bfloat16", "Google Cloud TPU v5e documentation"
    ),
    Peak("TPU v5p", r"\bTPU v5p?$", None, None, 459e12, None, "bfloat16", "Google Cloud TPU v5p documentation"),
    Peak(
        "TPU v6e", r"\bTPU v6 ?(lite|e)\b", None, None, 918e12, None, "bfloat16", "Google Cloud TPU v6e documentation"
    ),
)
MATH_NAMES = {"float32": "FP32", "tf32": "TF32 tensor core", "bfloat16": "bfloat16", "float16": "float16"}


def find_peak(device_kind: str) -> Peak | None:
    """Returns the first ``PEAKS`` entry whose pattern occurs in ``device_kind`` (case-insensitive), or None."""
    return next((p for p in PEAKS if re.search(p.pattern, device_kind.strip(), re.IGNORECASE)), None)


def peak_flops(device_kind: str, dtype: str, full_float32: bool = False) -> dict[str, Any]:
    """Returns ``{"flops_per_s": dense peak FLOP/s or None, "basis": what it is, in words}`` for compute
    ``dtype`` (float32, bfloat16, float16) on ``device_kind`` (``jax.Device.device_kind`` or
    ``torch.cuda.get_device_name``). float32 uses the peak of JAX's default precision (``Peak.float32_default``),
    or true FP32 with ``full_float32`` (``jax_default_matmul_precision`` highest/float32, or TF32 turned off
    in PyTorch). None for a device kind or dtype the table does not hold, and for a MIG slice of a GPU."""
    if re.search(r"\bMIG\b", device_kind):  # e.g. "NVIDIA A100-SXM4-40GB MIG 1g.5gb": a slice of the chip
        return {"flops_per_s": None, "basis": f"unknown: {device_kind!r} is a MIG slice, a fraction of the GPU"}
    peak = find_peak(device_kind)
    if peak is None:
        return {"flops_per_s": None, "basis": f"unknown: no peak known for device kind {device_kind!r}"}
    math = dtype
    if dtype == "float32":
        math = "float32" if full_float32 else peak.float32_default
    value = getattr(peak, math, None)
    if value is None:
        return {"flops_per_s": None, "basis": f"unknown: {peak.name} has no {dtype} peak in the table"}
    how = "" if dtype == math else f" (what {dtype} runs at by default)"
    return {
        "flops_per_s": value,
        "basis": f"{peak.name}, dense {MATH_NAMES[math]} peak {value / TERA:g} TFLOP/s{how}; {peak.source}",
    }


def mfu(flops_per_step: int, ms_per_step: float, peak_flops_per_s: float | None) -> float | None:
    """Returns the model FLOP utilization, achieved FLOP/s / peak FLOP/s, or None without a peak."""
    if peak_flops_per_s is None:
        return None
    return flops_per_step / (ms_per_step / 1e3) / peak_flops_per_s


def versions() -> dict[str, str]:
    """Returns the versions of Python and the libraries the jax side runs on."""
    import flax
    import jaxlib

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
    }


def _full_float32_in_jax() -> bool:
    """Whether ``jax_default_matmul_precision`` asks for true float32 (otherwise float32 runs at the default)."""
    precision = jax.config.jax_default_matmul_precision
    return str(precision).lower() in ("highest", "float32", "f32_f32_f32")


def count_flops(model: nn.Module, batch_size: int, image_shape: Sequence[int] = IMAGE_SHAPE) -> tuple[int, int]:
    """Returns (eval FLOPs, train FLOPs) of one batch through ``model`` (see the module docstring).

    Every ``nn.Conv`` and ``nn.Dense`` call is counted with ``jaxcifar.models.conv.flops``: a Dense layer is
    a convolution with an empty window over the leading (batch and any spatial) axes.
    """
    layers: list[int] = []

    def interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Conv | nn.Dense):
            batch, out_hw, c_in = out.shape[0], out.shape[1:-1], args[0].shape[-1]
            window: Sequence[int] = ()
            if isinstance(module, nn.Conv):
                window, c_in = module.kernel_size, c_in // module.feature_group_count
            layers.append(conv_flops(batch, out_hw, window, c_in, module.features))
        return out

    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    batch = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, b: model.apply(v, b, train=False), variables, batch)
    forward = sum(layers)
    return forward, 3 * forward - (layers[0] if layers else 0)


def describe_devices(devices: Sequence[Any]) -> dict[str, Any]:
    """Returns ``{"device": platform, "device_kind": model, "device_count": len(devices)}``: the first of
    ``devices`` (the one the bench runs on) and how many there are."""
    return {"device": devices[0].platform, "device_kind": devices[0].device_kind, "device_count": len(devices)}


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def time_steps(run: Callable[[], Any], steps_: int, warmup: int) -> dict[str, float]:
    """Runs ``run`` (which must wait for its result) ``warmup`` times, then times it ``steps_`` times.

    Returns ``{"ms_per_step": median wall ms, "min_ms": fastest wall ms, "cpu_ms_per_step": median
    process CPU ms}``.
    """
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(steps_):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "ms_per_step": 1e3 * statistics.median(wall),
        "min_ms": 1e3 * min(wall),
        "cpu_ms_per_step": 1e3 * statistics.median(cpu),
    }


def _summary(
    timing: dict[str, float], batch_size: int, flops: int, compile_s: float | None, peak_flops_per_s: float | None
) -> dict[str, Any]:
    seconds = timing["ms_per_step"] / 1e3
    out = {
        "images_per_s": batch_size / seconds,
        "ms_per_step": timing["ms_per_step"],
        "compile_s": compile_s,
        "gflops_per_s": flops / seconds / 1e9,
        "min_ms": timing["min_ms"],
        "cpu_ms_per_step": timing["cpu_ms_per_step"],
    }
    out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
    utilization = mfu(flops, timing["ms_per_step"], peak_flops_per_s)
    out["mfu"] = None if utilization is None else float(f"{utilization:.4g}")  # 4 significant digits
    return out


def random_batch(batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns uint8 images (B, 32, 32, 3) and int32 labels (B,) drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8)
    return images, rng.integers(0, NUM_CLASSES, batch_size, dtype=np.int32)


def bench_jax(
    model_name: str,
    width: int,
    batch_size: int,
    dtype: str,
    conv_impl: str,
    steps_: int,
    warmup: int,
    images: np.ndarray,
    labels: np.ndarray,
    xla_cpu_conv: str = "eigen",
    peak_flops_per_s: float | None = None,
) -> dict[str, Any]:
    """Compiles and times the train and eval steps (XLA options ``backend.compiler_options(xla_cpu_conv)``).
    Returns ``{"train": {...}, "eval": {...}, "flops_per_step": {...}}``.

    Each part holds ``images_per_s``, ``ms_per_step`` (median), ``compile_s``, ``gflops_per_s``,
    ``min_ms``, ``cpu_ms_per_step`` and ``mfu`` (against ``peak_flops_per_s``; None without it).
    """
    config = Config(
        model=model_name, width=width, dtype=dtype, batch_size=batch_size, conv_impl=conv_impl, augment=AUGMENT
    )
    model = network.build_model(config, jax.devices()[:1])  # compute dtype: models.COMPUTE_DTYPES[dtype]
    tx = optim.make_optimizer(config, optax.constant_schedule(0.01))
    state = create_train_state(model, tx, seed=0)
    mean, std = NORMALIZATION["cifar10"]
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    eval_batch = {**batch, "mask": jax.device_put(np.ones(batch_size, bool))}
    eval_flops, train_flops = count_flops(model, batch_size)

    options = backend.compiler_options(xla_cpu_conv)
    t0 = time.perf_counter()
    train_step = steps.make_train_step(mean, std, config.augment, config.cutout_size, xla_options=options)
    train_step = train_step.lower(state, batch).compile()
    train_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    eval_step = steps.make_eval_step(mean, std, xla_options=options).lower(state, eval_batch).compile()
    eval_compile = time.perf_counter() - t0

    def run_train() -> None:
        nonlocal state
        state, metrics = train_step(state, batch)
        jax.block_until_ready((state, metrics))

    def run_eval() -> None:
        jax.block_until_ready(eval_step(state, eval_batch))

    train = time_steps(run_train, steps_, warmup)
    evaluation = time_steps(run_eval, steps_, warmup)
    return {
        "train": _summary(train, batch_size, train_flops, round(train_compile, 2), peak_flops_per_s),
        "eval": _summary(evaluation, batch_size, eval_flops, round(eval_compile, 2), peak_flops_per_s),
        "flops_per_step": {"train": train_flops, "eval": eval_flops},
    }


def select_torch_device(torch: Any, requested: str = "auto", jax_platform: str = "cpu") -> Any:
    """Returns the ``torch.device`` the PyTorch side runs on: ``"cuda"`` (the current CUDA device), ``"cpu"``,
    or ``"auto"``: CUDA when JAX runs on a GPU (``jax_platform == "gpu"``) and ``torch.cuda.is_available()``,
    else the CPU, so that both sides run on the same kind of device. Raises DataError for ``"cuda"`` without CUDA.
    """
    if requested not in TORCH_DEVICES:
        raise ValueError(f"unknown torch device {requested!r}; expected one of: {', '.join(TORCH_DEVICES)}")
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise DataError(
            "--torch-device cuda: torch.cuda.is_available() is False (a CPU-only PyTorch build, or no visible GPU)"
        )
    if requested == "cuda" or (requested == "auto" and cuda and jax_platform == "gpu"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def torch_crop_flip(torch: Any, images: Any, offsets: Any, flip: Any, padding: int = CROP_PADDING) -> Any:
    """PyTorch's ``transforms.random_crop`` + ``random_flip`` with the random draws given: the crop at
    ``offsets`` (B, 2) (row, column) of each zero-padded image, mirrored left-right where ``flip`` (B,)
    is True. ``images``: (B, H, W, C) of any dtype, on any device; returns the same shape, dtype and device.
    One gather, so it stays on the device."""
    b, h, w, _ = images.shape
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))
    rows_h = torch.arange(h, device=images.device)
    cols_w = torch.arange(w, device=images.device)
    rows = offsets[:, :1] + rows_h  # (B, H)
    cols = offsets[:, 1:] + torch.where(flip[:, None], cols_w.flip(0), cols_w)  # (B, W): a flip reads backwards
    index = torch.arange(b, device=images.device)
    return padded[index[:, None, None], rows[:, :, None], cols[:, None, :]]


def _dynamo_frames(torch: Any) -> Callable[[], int | None]:
    """Returns a function that counts the frames ``torch.compile`` has compiled so far (None where the
    counter, a private part of torch._dynamo, is missing)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return lambda: None
    return lambda: sum(counters["frames"].values())


def warm_up_compiled(
    run: Callable[[], Any], frames: Callable[[], int | None], max_calls: int = MAX_COMPILE_CALLS
) -> int:
    """Calls ``run`` until a call compiles nothing new (``frames()``, the count of compiled frames, unchanged
    by it; a single call when ``frames()`` is None), at most ``max_calls`` times. Returns the number of calls."""
    calls = 0
    while calls < max_calls:
        before = frames()
        run()
        calls += 1
        if before is None or frames() == before:
            break
    return calls


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def bench_torch(
    model_name: str,
    width: int,
    batch_size: int,
    dtype: str,
    steps_: int,
    warmup: int,
    images: np.ndarray,
    labels: np.ndarray,
    threads: int,
    device: str = "auto",
    compile_model: bool = False,
    jax_platform: str = "cpu",
) -> dict[str, Any]:
    """Times a PyTorch train step (``TORCH_STEPS["train"]``: on-device crop-flip, SGD with Nesterov momentum
    and weight decay) and eval step on ``images`` on ``select_torch_device(torch, device, jax_platform)``.

    Eager: both memory formats are timed and the faster one is reported. ``compile_model``: the model is
    wrapped in ``torch.compile`` (default mode; augmentation, loss and the optimizer step stay eager), only
    channels_last is timed, and ``compile_s`` of each part is the wall time of its first calls, repeated
    until one compiles nothing new (each call includes its step), before the ``warmup`` steps.
    Returns ``{"train", "eval", "memory_format", "other_format", "threads", "version", "device",
    "device_name", "cuda", "cudnn", "tf32", "cudnn_benchmark", "autocast", "loss_scaling", "compile",
    "steps", "peak"}``.
    Raises DataError when torch.compile fails.
    """
    import torch  # optional dependency: only here

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = select_torch_device(torch, device, jax_platform)
    cuda = dev.type == "cuda"

    def sync() -> None:  # the timed steps wait for their results, as jax.block_until_ready does
        if cuda:
            torch.cuda.synchronize(dev)

    device_name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    tf32 = {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    peak = peak_flops(device_name, dtype, full_float32=cuda and not tf32["cudnn_conv"])
    mean, std = (torch.tensor(v, dtype=torch.float32, device=dev).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    images_t = torch.from_numpy(images).to(dev)  # uint8 (B, H, W, C), on the device once, as the jax side's
    y = torch.from_numpy(labels.astype(np.int64)).to(dev)
    generator = torch.Generator(device=dev)
    generator.manual_seed(0)
    eval_flops, train_flops = count_flops(models.get_model(model_name, width=width), batch_size)
    config = Config()
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)  # float32: no autocast
    frames = _dynamo_frames(torch)
    benchmark_before = torch.backends.cudnn.benchmark
    if cuda:  # cuDNN picks its convolution algorithms by timing them, as XLA's autotuner does
        torch.backends.cudnn.benchmark = True
    formats = ("channels_last",) if compile_model else ("channels_last", "contiguous")
    results: dict[str, Any] = {}
    recompiled = False
    try:
        for memory_format in formats:
            fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
            if model_name in torch_fast.TWINS:
                model = torch_fast.twin(model_name, NUM_CLASSES, width).to(device=dev, memory_format=fmt)
            else:
                model = torch_resnet.resnet(model_name, NUM_CLASSES, width).to(device=dev, memory_format=fmt)
            opt = torch.optim.SGD(
                model.parameters(),
                lr=0.01,
                momentum=config.momentum,
                nesterov=config.nesterov,
                weight_decay=config.weight_decay,
            )
            net = model
            if compile_model:
                try:
                    net = torch.compile(model)
                except Exception as e:  # e.g. a Python version torch.compile does not support
                    raise DataError(f"--torch-compile: torch.compile is unavailable here: {_first_line(e)}") from e

            # float16: dynamic loss scaling, as the jax side's state (jaxcifar.state.default_dynamic_scale)
            scaler = torch.amp.GradScaler(dev.type, enabled=dtype == "float16")

            def autocast() -> Any:
                return torch.autocast(dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=bool(autocast_dtype))

            def normalized(x: Any, fmt: Any = fmt) -> Any:
                x = x.permute(0, 3, 1, 2).float().div_(255.0)  # NHWC viewed as NCHW: channels_last strides
                return ((x - mean) / std).contiguous(memory_format=fmt)

            def run_train(
                model: Any = model, net: Any = net, opt: Any = opt, normalized: Any = normalized, scaler: Any = scaler
            ) -> None:
                model.train()
                opt.zero_grad(set_to_none=True)
                offsets = torch.randint(0, 2 * CROP_PADDING + 1, (batch_size, 2), device=dev, generator=generator)
                flip = torch.randint(0, 2, (batch_size,), device=dev, generator=generator).bool()
                x = normalized(torch_crop_flip(torch, images_t, offsets, flip))
                with autocast():
                    loss = torch.nn.functional.cross_entropy(net(x).float(), y)
                scaler.scale(loss).backward()  # disabled (float32, bfloat16): loss.backward(), opt.step()
                scaler.step(opt)
                scaler.update()
                sync()

            def run_eval(model: Any = model, net: Any = net, normalized: Any = normalized) -> None:
                model.eval()
                with torch.inference_mode(), autocast():
                    logits = net(normalized(images_t)).float()
                    loss_sum = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                    correct = (logits.argmax(-1) == y).sum()
                del loss_sum, correct
                sync()

            def compile_phase(run: Callable[[], None]) -> float | None:
                if not compile_model:
                    return None
                t0 = time.perf_counter()
                try:
                    warm_up_compiled(run, frames)
                except Exception as e:  # the backend (inductor) failed: no compiler, unsupported op, ...
                    raise DataError(f"--torch-compile: torch.compile failed on {dev}: {_first_line(e)}") from e
                return round(time.perf_counter() - t0, 2)

            part = {}
            for name, run_step, flops in (("train", run_train, train_flops), ("eval", run_eval, eval_flops)):
                compile_s = compile_phase(run_step)
                before = frames()
                timing = time_steps(run_step, steps_, warmup)
                recompiled = recompiled or (compile_model and before is not None and frames() != before)
                part[name] = _summary(timing, batch_size, flops, compile_s, peak["flops_per_s"])
            results[memory_format] = part
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
    best = max(results, key=lambda k: results[k]["train"]["images_per_s"])
    other = next((k for k in results if k != best), None)
    return {
        **results[best],
        "memory_format": best,
        "other_format": None
        if other is None
        else {
            "memory_format": other,
            "train_images_per_s": results[other]["train"]["images_per_s"],
            "eval_images_per_s": results[other]["eval"]["images_per_s"],
        },
        "threads": threads,
        "version": torch.__version__,
        "device": str(dev),
        "device_name": device_name,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32": tf32 if cuda else None,
        "cudnn_benchmark": True if cuda else None,
        "autocast": dtype if autocast_dtype else None,
        "loss_scaling": "torch.amp.GradScaler" if dtype == "float16" else None,
        "compile": {
            "mode": "default",
            "what": "torch.compile(model): forward and backward; augmentation, loss and SGD step eager",
            "recompiled_while_timing": recompiled,
        }
        if compile_model
        else None,
        "steps": TORCH_STEPS,
        "peak": peak,
    }


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(result: dict[str, Any]) -> str:
    """Returns the human-readable report of a ``run`` result (a few lines, fixed-width table)."""
    v = result["versions"]
    lines = [
        f"device: {result['device_kind']} ({result['device']}, {result['platform_version']}; 1 of "
        f"{result['device_count']} devices used, {result['threads']} threads), "
        f"{result['model']} width {result['width']}, batch {result['batch_size']}, {result['dtype']}, "
        f"conv {result['conv_impl']}",
        f"versions: python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}"
        + (f", torch {result['torch']['version']}" if result.get("torch") else ""),
        "XLA compiler options: "
        + (", ".join(f"{k}={v}" for k, v in result["xla_options"].items()) or "XLA's defaults"),
        f"load average: {result['load_average']['before']} before, {result['load_average']['after']} after "
        "(other programs on the machine slow the wall times; CPU ms is less affected)",
        f"FLOPs per step ({FLOPS_METHOD}): train {result['flops_per_step']['train'] / 1e9:.1f} G, "
        f"eval {result['flops_per_step']['eval'] / 1e9:.1f} G",
        f"MFU = GFLOP/s / peak; jax's peak: {result['peak']['basis']}",
        f"{'':14}{'images/s':>10}{'ms/step':>10}{'min ms':>10}{'CPU ms':>10}{'compile s':>11}{'GFLOP/s':>11}{'MFU':>8}",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        return (
            f"{name:14}{r['images_per_s']:10.1f}{r['ms_per_step']:10.1f}{r['min_ms']:10.1f}"
            f"{r['cpu_ms_per_step']:10.1f}{compile_s:>11}{r['gflops_per_s']:11.1f}{_percent(r['mfu']):>8}"
        )

    lines += [row("jax train", result["train"]), row("jax eval", result["eval"])]
    torch_result = result.get("torch")
    if torch_result:
        lines += [row("torch train", torch_result["train"]), row("torch eval", torch_result["eval"])]
        t = torch_result
        how = "torch.compile (compile s = first calls until nothing new compiles, each with its step)"
        if t["compile"] is None:
            how = "eager"
        on = f"on {t['device']} ({t['device_name']}"
        if t["cuda"]:
            tf32 = t["tf32"]
            on += (
                f", CUDA {t['cuda']}, cuDNN {t['cudnn']}, cudnn.benchmark, TF32 convolutions "
                f"{'on' if tf32['cudnn_conv'] else 'off'}, matmuls {'on' if tf32['matmul'] else 'off'}"
            )
        on += ")"
        other = t["other_format"]
        fmt = t["memory_format"]
        if other:
            fmt += (
                f" (faster than {other['memory_format']}: {other['train_images_per_s']:.1f} train, "
                f"{other['eval_images_per_s']:.1f} eval images/s)"
            )
        autocast = f", {t['autocast']} autocast" if t["autocast"] else ""
        autocast += " with GradScaler" if t["loss_scaling"] else ""
        lines.append(f"torch {t['version']} {how}, {fmt}{autocast}, {on}, {t['threads']} threads")
        lines.append(f"torch train step: {t['steps']['train']}; torch's peak: {t['peak']['basis']}")
        if t["compile"] and t["compile"]["recompiled_while_timing"]:
            lines.append("warning: torch.compile compiled again while timing: its times include compilation")
        if t["device"].split(":")[0] != {"gpu": "cuda"}.get(result["device"], result["device"]):
            lines.append(
                f"warning: torch runs on {t['device']}, jax on {result['device']}: the ratio compares different devices"
            )
        ratio = result["ratio_vs_torch"]
        lines.append(f"jax / torch images/s: train {ratio['train']:.2f}x, eval {ratio['eval']:.2f}x")
    return "\n".join(lines)


def _platform_version(device: Any) -> str:
    try:
        return str(device.client.platform_version)
    except AttributeError:
        return "unknown"


def run(
    model: str = "resnet18",
    width: int = 64,
    batch_size: int = 128,
    dtype: str = "float32",
    conv_impl: str = "auto",
    steps_: int = 5,
    warmup: int = 1,
    compare_torch: bool = False,
    xla_cpu_conv: str = "eigen",
    torch_device: str = "auto",
    torch_compile: bool = False,
) -> dict[str, Any]:
    """Runs the benchmark and returns its result dict (the ``--json`` line).

    Keys: ``train``/``eval`` (each ``images_per_s``, ``ms_per_step``, ``compile_s``, ``gflops_per_s``,
    ``min_ms``, ``cpu_ms_per_step``, ``mfu``), ``device`` (the platform of the device the steps run on, JAX's
    first), ``device_kind`` (its model, e.g. ``NVIDIA H100 80GB HBM3``), ``device_count`` (the devices JAX sees;
    the steps run on one), ``platform_version`` (e.g. the CUDA version XLA was built for), ``versions``
    (python, jax, jaxlib, flax, numpy), ``peak`` (``peak_flops``: ``flops_per_s`` or None, ``basis``),
    ``jax_default_matmul_precision``, ``batch_size``, ``model``, ``width``, ``dtype``, ``conv_impl``, ``augment``,
    ``xla_options``, ``threads``, ``flops_per_step``, ``flops_method``, ``load_average``,
    ``xla_python_client_preallocate`` (the environment variable), and with ``compare_torch`` also ``torch``
    (``bench_torch``'s dict: the same per-part keys, its device, versions, peak, compile) and ``ratio_vs_torch``.
    """
    images, labels = random_batch(batch_size)
    load_before = _load_average()
    devices = jax.devices()
    precision = jax.config.jax_default_matmul_precision
    result: dict[str, Any] = {
        **describe_devices(devices),
        "platform_version": _platform_version(devices[0]),
        "versions": versions(),
        "peak": peak_flops(devices[0].device_kind, dtype, full_float32=_full_float32_in_jax()),
        "jax_default_matmul_precision": None if precision is None else str(precision),
        "batch_size": batch_size,
        "model": model,
        "width": width,
        "dtype": dtype,
        "conv_impl": backend.describe_conv(conv_impl, devices[:1]),
        "augment": AUGMENT,
        "xla_options": backend.compiler_options(xla_cpu_conv),
        "threads": _threads(),
        "flops_method": FLOPS_METHOD,
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
    }
    result.update(
        bench_jax(
            model,
            width,
            batch_size,
            dtype,
            conv_impl,
            steps_,
            warmup,
            images,
            labels,
            xla_cpu_conv,
            peak_flops_per_s=result["peak"]["flops_per_s"],
        )
    )
    if compare_torch:
        result["torch"] = bench_torch(
            model,
            width,
            batch_size,
            dtype,
            steps_,
            warmup,
            images,
            labels,
            threads=result["threads"],
            device=torch_device,
            compile_model=torch_compile,
            jax_platform=result["device"],
        )
        result["versions"]["torch"] = result["torch"]["version"]
        result["ratio_vs_torch"] = {
            part: round(result[part]["images_per_s"] / result["torch"][part]["images_per_s"], 3)
            for part in ("train", "eval")
        }
    result["load_average"] = {"before": load_before, "after": _load_average()}
    return result


def build_parser() -> cli.ArgumentParser:
    """Returns the parser of ``python -m jaxcifar.bench``."""
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Time the jitted train and eval steps (images/s, ms/step, compile s, GFLOP/s, MFU) on one "
        "random batch, optionally against a PyTorch model of the same architecture.",
    )
    parser.add_argument(
        "--model", default="resnet18", choices=models.available_models(), help="Model. (default: %(default)s)"
    )
    parser.add_argument(
        "--width", type=int, default=64, metavar="INT", help="Base channel count of the ResNet. (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=128,
        metavar="INT",
        help="Images per train and eval step. (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="Compute dtype; params stay float32 (PyTorch: autocast). (default: %(default)s)",
    )
    parser.add_argument(
        "--conv",
        default="auto",
        choices=backend.CONV_IMPLS,
        help=f"{Config.__dataclass_fields__['conv_impl'].metadata['help']} As --conv-impl of training. "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--xla-cpu-conv",
        default="eigen",
        choices=backend.XLA_CPU_CONVOLUTIONS,
        help="On CPU, which kernels run XLA's convolutions: eigen (jaxcifar's compiler option, "
        "jaxcifar.backend.compiler_options) or ynnpack (XLA's default, to compare). (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=5, metavar="INT", help="Timed steps of each kind. (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="INT",
        help="Untimed steps after compiling, before timing. (default: %(default)s)",
    )
    parser.add_argument(
        "--compare-torch",
        action="store_true",
        help="Also time a PyTorch model of the same architecture doing the same steps on the same batch "
        "(needs torch); on the GPU when JAX runs on one and torch.cuda.is_available().",
    )
    parser.add_argument(
        "--torch-device",
        default="auto",
        choices=TORCH_DEVICES,
        help="--compare-torch: where PyTorch runs; auto = cuda when JAX runs on a GPU and PyTorch has CUDA, "
        "else cpu. (default: %(default)s)",
    )
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="--compare-torch: wrap the PyTorch model in torch.compile (channels_last only); its compile time "
        "is reported apart and the timed steps exclude it (needs a C compiler on CPU).",
    )
    parser.add_argument(
        "--json", action="store_true", help="End the output with the result as one JSON line (the last line)."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (0 ok; bad flags exit 2, a missing torch or a failed torch.compile
    exits 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    minimums = {"--width": (args.width, 1), "--batch-size": (args.batch_size, 1), "--steps": (args.steps, 1)}
    minimums["--warmup"] = (args.warmup, 0)
    for flag, (value, low) in minimums.items():
        if value < low:
            parser.error(f"argument {flag}: must be >= {low}, got {value}")
    if not args.compare_torch:
        for flag, given in (("--torch-compile", args.torch_compile), ("--torch-device", args.torch_device != "auto")):
            if given:
                parser.error(f"argument {flag}: needs --compare-torch")
    elif not hasattr(models.get_model(args.model), "stage_sizes") and args.model not in torch_fast.TWINS:
        parser.error(f"argument --compare-torch: no PyTorch twin of {args.model} yet")
    else:
        # Both libraries share the GPU: JAX would otherwise take 75 % of its memory when its backend starts
        # (the first jax.devices() below); a value set by the user is kept. No effect once JAX has started.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return cli.run_command(
        PROG,
        lambda: _bench(args),
        lambda: "nothing measured is kept (the bench writes no files)",
        f"try a smaller --batch-size (now {args.batch_size})",
    )


def _bench(args: argparse.Namespace) -> int:
    config = Config(
        model=args.model,
        width=args.width,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        dtype=args.dtype,
    )
    sizing.check_fits(config, models.get_model(args.model, width=args.width), jax.devices()[:1])
    if args.compare_torch:
        try:
            import torch
        except ImportError:
            raise DataError("--compare-torch needs PyTorch: pip install torch") from None
        select_torch_device(torch, args.torch_device, jax.devices()[0].platform)  # fails before timing anything
    result = run(
        model=args.model,
        width=args.width,
        batch_size=args.batch_size,
        dtype=args.dtype,
        conv_impl=args.conv,
        steps_=args.steps,
        warmup=args.warmup,
        compare_torch=args.compare_torch,
        xla_cpu_conv=args.xla_cpu_conv,
        torch_device=args.torch_device,
        torch_compile=args.torch_compile,
    )
    print(format_table(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    interrupts.exit_with(main)
