"""What ``python -m jaxcifar.bench`` measures, and how, on both sides of ``--compare-torch``: the ``BenchSpec``,
the step timer, the analytic FLOP count, the devices' peak FLOP/s and the model FLOP utilization (MFU).

FLOPs are counted analytically, not measured: 2 per multiply-add of every convolution and dense
layer (BatchNorm, activations and the optimizer, under 1% together, are left out). Forward = the
eval step; train step = 3 x forward (forward, input gradient, weight gradient) minus the first
layer's input gradient, which is not computed.

MFU (model FLOP utilization) = achieved FLOP/s (this analytic count) / the device's dense peak for the
compute dtype, from ``PEAKS`` (vendor datasheets, matched on the device kind); None where the device is
not in the table (every CPU).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar.config import Config
from jaxcifar.models.conv import flops as conv_flops

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
AUGMENT = "crop-flip"  # the train step's augmentation, on both sides of --compare-torch
FLOPS_METHOD = (
    "analytic: 2 x multiply-adds of convolutions and dense layers; train = 3 x forward - first layer's input gradient"
)


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """What ``python -m jaxcifar.bench`` times: the model and its steps as training builds them (``config()``),
    how many steps, XLA's CPU convolution kernels, and whether (and how) PyTorch is timed beside it."""

    model: str = "resnet18"
    width: int = 64
    batch_size: int = 128  # images per train and per eval step
    dtype: str = "float32"
    conv_impl: str = "auto"
    steps: int = 5  # timed steps of each kind
    warmup: int = 1  # untimed steps after compiling, before timing
    xla_cpu_conv: str = "eigen"  # backend.XLA_CPU_CONVOLUTIONS
    compare_torch: bool = False
    torch_device: str = "auto"  # torch_bench.TORCH_DEVICES
    torch_compile: bool = False

    def config(self) -> Config:
        """Returns the training ``Config`` whose steps are timed (its optimizer: SGD with Config's defaults)."""
        return Config(
            model=self.model,
            width=self.width,
            dtype=self.dtype,
            batch_size=self.batch_size,
            eval_batch_size=self.batch_size,
            conv_impl=self.conv_impl,
            augment=AUGMENT,
        )


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


def time_steps(run: Callable[[], Any], steps: int, warmup: int) -> dict[str, float]:
    """Runs ``run`` (which must wait for its result) ``warmup`` times, then times it ``steps`` times.

    Returns ``{"ms_per_step": median wall ms, "min_ms": fastest wall ms, "cpu_ms_per_step": median
    process CPU ms}``.
    """
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "ms_per_step": 1e3 * statistics.median(wall),
        "min_ms": 1e3 * min(wall),
        "cpu_ms_per_step": 1e3 * statistics.median(cpu),
    }


def summary(
    timing: dict[str, float], batch_size: int, flops: int, compile_s: float | None, peak_flops_per_s: float | None
) -> dict[str, Any]:
    """Returns one part's line of the result: ``images_per_s``, ``ms_per_step``, ``compile_s``, ``gflops_per_s``,
    ``min_ms``, ``cpu_ms_per_step`` (3 decimals) and ``mfu`` (4 significant digits; None without a peak),
    from ``time_steps``'s ``timing`` of steps of ``batch_size`` images and ``flops`` FLOPs each."""
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
