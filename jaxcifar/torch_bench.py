"""The PyTorch side of ``python -m jaxcifar.bench --compare-torch``: a PyTorch model of the same architecture
doing what the jax steps do, on the same images, in the same process, timed the same way.

The model: ``jaxcifar.torch_resnet`` (kuangliu/pytorch-cifar's ResNet) or, for resnet9 and airbench,
``jaxcifar.torch_fast``; same widths, batch and thread count, the dtype via autocast (float16 with a
GradScaler, as the jax side's dynamic loss scale). The steps (``TORCH_STEPS``): the uint8 batch lives on the
device, the train step crops and flips it per image there, normalizes, runs forward, backward and SGD. It runs
on the GPU (``cuda``) when JAX does and ``torch.cuda.is_available()``, else on the CPU (``--torch-device``
forces one); the code is the same for both, with the device as a variable and ``torch.cuda.synchronize``
ending every timed step on CUDA. Eager by default, in both memory formats (the faster one is reported);
``--torch-compile`` wraps the model in ``torch.compile`` (channels_last only) and reports its compile time
apart.

torch is an optional dependency: it is imported only inside ``bench_torch``, and handed to the rest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcifar import models, torch_fast, torch_resnet
from jaxcifar.data import NORMALIZATION
from jaxcifar.errors import DataError
from jaxcifar.measure import NUM_CLASSES, BenchSpec, count_flops, peak_flops, summary, time_steps

CROP_PADDING = 4  # transforms.random_crop's default
TORCH_STEPS = {
    "train": "uint8 batch on the device -> per-image random crop (4-px zero padding) and flip on the device -> "
    "normalize -> forward -> cross-entropy -> backward -> SGD (Nesterov momentum, weight decay)",
    "eval": "uint8 batch on the device -> normalize -> eval-mode forward -> summed cross-entropy and correct count",
}
TORCH_DEVICES = ("auto", "cpu", "cuda")
MAX_COMPILE_CALLS = 5  # --torch-compile: calls until one compiles nothing new (at most this many)


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


@dataclasses.dataclass(frozen=True)
class _Side:
    """What every timed PyTorch step shares: torch, its device, the batch there and the random draws."""

    torch: Any
    spec: BenchSpec
    dev: Any  # torch.device
    images: Any  # uint8 (B, H, W, C) on dev
    labels: Any  # int64 (B,) on dev
    mean: Any  # float32 (1, 3, 1, 1) on dev
    std: Any
    generator: Any  # the crops' and flips' random draws
    frames: Callable[[], int | None]  # torch.compile's compiled frames so far

    @property
    def cuda(self) -> bool:
        return bool(self.dev.type == "cuda")

    def sync(self) -> None:
        """Waits for the device's work (CUDA), as jax.block_until_ready does: every timed step ends with it."""
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def autocast(self) -> Any:
        """Returns the autocast context of the spec's dtype (disabled for float32)."""
        half = {"bfloat16": self.torch.bfloat16, "float16": self.torch.float16}.get(self.spec.dtype)
        return self.torch.autocast(self.dev.type, dtype=half or self.torch.bfloat16, enabled=half is not None)

    def normalized(self, x: Any, fmt: Any) -> Any:
        """Returns uint8 (B, H, W, C) ``x`` as normalized float32 NCHW in memory format ``fmt``."""
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # NHWC viewed as NCHW: channels_last strides
        return ((x - self.mean) / self.std).contiguous(memory_format=fmt)


def _side(torch: Any, spec: BenchSpec, images: np.ndarray, labels: np.ndarray, jax_platform: str) -> _Side:
    dev = select_torch_device(torch, spec.torch_device, jax_platform)
    mean, std = (torch.tensor(v, dtype=torch.float32, device=dev).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    generator = torch.Generator(device=dev)
    generator.manual_seed(0)
    return _Side(
        torch=torch,
        spec=spec,
        dev=dev,
        images=torch.from_numpy(images).to(dev),  # uint8 (B, H, W, C), on the device once, as the jax side's
        labels=torch.from_numpy(labels.astype(np.int64)).to(dev),
        mean=mean,
        std=std,
        generator=generator,
        frames=_dynamo_frames(torch),
    )


def _steps(side: _Side, fmt: Any) -> tuple[Callable[[], None], Callable[[], None]]:
    """Builds the model in memory format ``fmt`` (under torch.compile with ``--torch-compile``), its SGD and
    loss scaler; returns its (train step, eval step), each waiting for its result."""
    torch, spec, dev = side.torch, side.spec, side.dev
    if spec.model in torch_fast.TWINS:
        model = torch_fast.twin(spec.model, NUM_CLASSES, spec.width).to(device=dev, memory_format=fmt)
    else:
        model = torch_resnet.resnet(spec.model, NUM_CLASSES, spec.width).to(device=dev, memory_format=fmt)
    config = spec.config()
    opt = torch.optim.SGD(
        model.parameters(),
        lr=0.01,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    net = model
    if spec.torch_compile:
        try:
            net = torch.compile(model)
        except Exception as e:  # e.g. a Python version torch.compile does not support
            raise DataError(f"--torch-compile: torch.compile is unavailable here: {_first_line(e)}") from e
    # float16: dynamic loss scaling, as the jax side's state (jaxcifar.state.default_dynamic_scale)
    scaler = torch.amp.GradScaler(dev.type, enabled=spec.dtype == "float16")
    y, batch_size = side.labels, spec.batch_size

    def run_train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (batch_size, 2), device=dev, generator=side.generator)
        flip = torch.randint(0, 2, (batch_size,), device=dev, generator=side.generator).bool()
        x = side.normalized(torch_crop_flip(torch, side.images, offsets, flip), fmt)
        with side.autocast():
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        scaler.scale(loss).backward()  # disabled (float32, bfloat16): loss.backward(), opt.step()
        scaler.step(opt)
        scaler.update()
        side.sync()

    def run_eval() -> None:
        model.eval()
        with torch.inference_mode(), side.autocast():
            logits = net(side.normalized(side.images, fmt)).float()
            loss_sum = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            correct = (logits.argmax(-1) == y).sum()
        del loss_sum, correct
        side.sync()

    return run_train, run_eval


def _compile_seconds(side: _Side, run: Callable[[], None]) -> float | None:
    """``--torch-compile``: runs ``run`` until it compiles nothing new; returns the seconds (None when eager)."""
    if not side.spec.torch_compile:
        return None
    t0 = time.perf_counter()
    try:
        warm_up_compiled(run, side.frames)
    except Exception as e:  # the backend (inductor) failed: no compiler, unsupported op, ...
        raise DataError(f"--torch-compile: torch.compile failed on {side.dev}: {_first_line(e)}") from e
    return round(time.perf_counter() - t0, 2)


def _time_format(side: _Side, fmt: Any, flops: dict[str, int], peak: float | None) -> tuple[dict[str, Any], bool]:
    """Times the train and eval steps in memory format ``fmt``: returns ({part: ``measure.summary``}, whether
    torch.compile compiled again while timing)."""
    run_train, run_eval = _steps(side, fmt)
    part, recompiled = {}, False
    for name, run_step in (("train", run_train), ("eval", run_eval)):
        compile_s = _compile_seconds(side, run_step)
        before = side.frames()
        timing = time_steps(run_step, side.spec.steps, side.spec.warmup)
        recompiled = recompiled or (side.spec.torch_compile and before is not None and side.frames() != before)
        part[name] = summary(timing, side.spec.batch_size, flops[name], compile_s, peak)
    return part, recompiled


def bench_torch(
    spec: BenchSpec, images: np.ndarray, labels: np.ndarray, threads: int, jax_platform: str = "cpu"
) -> dict[str, Any]:
    """Times a PyTorch train step (``TORCH_STEPS["train"]``: on-device crop-flip, SGD with Nesterov momentum
    and weight decay) and eval step on ``images`` (uint8 (B, 32, 32, 3)) and ``labels`` (B,) with ``threads``
    threads, on ``select_torch_device(torch, spec.torch_device, jax_platform)``.

    Eager: both memory formats are timed and the faster one is reported. ``spec.torch_compile``: the model is
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
    side = _side(torch, spec, images, labels, jax_platform)
    device_name = torch.cuda.get_device_name(side.dev) if side.cuda else "cpu"
    tf32 = {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    peak = peak_flops(device_name, spec.dtype, full_float32=side.cuda and not tf32["cudnn_conv"])
    eval_flops, train_flops = count_flops(models.get_model(spec.model, width=spec.width), spec.batch_size)
    flops = {"train": train_flops, "eval": eval_flops}
    benchmark_before = torch.backends.cudnn.benchmark
    if side.cuda:  # cuDNN picks its convolution algorithms by timing them, as XLA's autotuner does
        torch.backends.cudnn.benchmark = True
    formats = {"channels_last": torch.channels_last}
    if not spec.torch_compile:
        formats["contiguous"] = torch.contiguous_format
    results: dict[str, Any] = {}
    recompiled = False
    try:
        for memory_format, fmt in formats.items():
            results[memory_format], again = _time_format(side, fmt, flops, peak["flops_per_s"])
            recompiled = recompiled or again
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
    return {
        **_best_format(results),
        "threads": threads,
        "version": torch.__version__,
        "device": str(side.dev),
        "device_name": device_name,
        "cuda": torch.version.cuda if side.cuda else None,
        "cudnn": torch.backends.cudnn.version() if side.cuda else None,
        "tf32": tf32 if side.cuda else None,
        "cudnn_benchmark": True if side.cuda else None,
        "autocast": spec.dtype if spec.dtype in ("bfloat16", "float16") else None,
        "loss_scaling": "torch.amp.GradScaler" if spec.dtype == "float16" else None,
        "compile": {
            "mode": "default",
            "what": "torch.compile(model): forward and backward; augmentation, loss and SGD step eager",
            "recompiled_while_timing": recompiled,
        }
        if spec.torch_compile
        else None,
        "steps": TORCH_STEPS,
        "peak": peak,
    }


def _best_format(results: dict[str, Any]) -> dict[str, Any]:
    """Returns the parts of the memory format with the most train images/s, its name, and the other's speeds."""
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
    }
