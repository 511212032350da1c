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

``--compare-torch`` times a PyTorch eager model of the same architecture (``jaxcifar.torch_resnet``:
kuangliu/pytorch-cifar's ResNet, same widths, batch, dtype via CPU autocast, same thread count) on the
same images in this process, in both memory formats (the faster one is reported), and prints the
ratio. PyTorch is optional and imported only then.
"""

from __future__ import annotations

from jaxcifar import interrupts

if __name__ == "__main__":  # first, before the heavy imports below: Ctrl-C ends in one line from the start
    interrupts.install("python -m jaxcifar.bench")

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcifar import backend, cli, models, network, optim, sizing, steps, torch_resnet
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


def _summary(timing: dict[str, float], batch_size: int, flops: int, compile_s: float | None) -> dict[str, float]:
    seconds = timing["ms_per_step"] / 1e3
    out = {
        "images_per_s": batch_size / seconds,
        "ms_per_step": timing["ms_per_step"],
        "compile_s": compile_s,
        "gflops_per_s": flops / seconds / 1e9,
        "min_ms": timing["min_ms"],
        "cpu_ms_per_step": timing["cpu_ms_per_step"],
    }
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


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
) -> dict[str, Any]:
    """Compiles and times the train and eval steps (XLA options ``backend.compiler_options(xla_cpu_conv)``).
    Returns ``{"train": {...}, "eval": {...}}``.

    Each part holds ``images_per_s``, ``ms_per_step`` (median), ``compile_s``, ``gflops_per_s``,
    ``min_ms`` and ``cpu_ms_per_step``.
    """
    config = Config(model=model_name, width=width, dtype=dtype, batch_size=batch_size, conv_impl=conv_impl)
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
        "train": _summary(train, batch_size, train_flops, round(train_compile, 2)),
        "eval": _summary(evaluation, batch_size, eval_flops, round(eval_compile, 2)),
        "flops_per_step": {"train": train_flops, "eval": eval_flops},
    }


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
) -> dict[str, Any]:
    """Times a PyTorch eager train step (SGD, Nesterov, weight decay) and eval forward on ``images``.

    Both memory formats are timed; returns the faster one's ``{"train", "eval", "memory_format",
    "threads", "version", "other_format": {"train_images_per_s", "eval_images_per_s"}}``.
    """
    import torch  # optional dependency: only here

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    x_nchw = torch.from_numpy((images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std)
    y = torch.from_numpy(labels.astype(np.int64))
    eval_flops, train_flops = count_flops(models.get_model(model_name, width=width), batch_size)
    config = Config()
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    results = {}
    for memory_format in ("channels_last", "contiguous"):
        fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        model = torch_resnet.resnet(model_name, NUM_CLASSES, width).to(memory_format=fmt)
        opt = torch.optim.SGD(
            model.parameters(),
            lr=0.01,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
        x = x_nchw.contiguous(memory_format=fmt)

        def run_train(model: Any = model, opt: Any = opt, x: Any = x) -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()

        def run_eval(model: Any = model, x: Any = x) -> None:
            model.eval()
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None),
            ):
                model(x)

        results[memory_format] = {
            "train": _summary(time_steps(run_train, steps_, warmup), batch_size, train_flops, None),
            "eval": _summary(time_steps(run_eval, steps_, warmup), batch_size, eval_flops, None),
        }
    best = max(results, key=lambda k: results[k]["train"]["images_per_s"])
    other = next(k for k in results if k != best)
    return {
        **results[best],
        "memory_format": best,
        "threads": threads,
        "version": torch.__version__,
        "other_format": {
            "memory_format": other,
            "train_images_per_s": results[other]["train"]["images_per_s"],
            "eval_images_per_s": results[other]["eval"]["images_per_s"],
        },
    }


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def format_table(result: dict[str, Any]) -> str:
    """Returns the human-readable report of a ``run`` result (a few lines, fixed-width table)."""
    lines = [
        f"device: {result['device_kind']} ({result['device']}; 1 of {result['device_count']} devices used, "
        f"{result['threads']} threads), "
        f"{result['model']} width {result['width']}, batch {result['batch_size']}, {result['dtype']}, "
        f"conv {result['conv_impl']}",
        "XLA compiler options: "
        + (", ".join(f"{k}={v}" for k, v in result["xla_options"].items()) or "XLA's defaults"),
        f"load average: {result['load_average']['before']} before, {result['load_average']['after']} after "
        "(other programs on the machine slow the wall times; CPU ms is less affected)",
        f"FLOPs per step ({FLOPS_METHOD}): train {result['flops_per_step']['train'] / 1e9:.1f} G, "
        f"eval {result['flops_per_step']['eval'] / 1e9:.1f} G",
        f"{'':14}{'images/s':>10}{'ms/step':>10}{'min ms':>10}{'CPU ms':>10}{'compile s':>11}{'GFLOP/s':>9}",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        return (
            f"{name:14}{r['images_per_s']:10.1f}{r['ms_per_step']:10.0f}{r['min_ms']:10.0f}"
            f"{r['cpu_ms_per_step']:10.0f}{compile_s:>11}{r['gflops_per_s']:9.1f}"
        )

    lines += [row("jax train", result["train"]), row("jax eval", result["eval"])]
    torch_result = result.get("torch")
    if torch_result:
        lines += [row("torch train", torch_result["train"]), row("torch eval", torch_result["eval"])]
        other = torch_result["other_format"]
        lines.append(
            f"torch {torch_result['version']} eager, {torch_result['memory_format']} (faster than "
            f"{other['memory_format']}: {other['train_images_per_s']:.1f} train, {other['eval_images_per_s']:.1f} "
            f"eval images/s), {torch_result['threads']} threads"
        )
        ratio = result["ratio_vs_torch"]
        lines.append(f"jax / torch images/s: train {ratio['train']:.2f}x, eval {ratio['eval']:.2f}x")
    return "\n".join(lines)


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
) -> dict[str, Any]:
    """Runs the benchmark and returns its result dict (the ``--json`` line).

    Keys: ``train``/``eval`` (each ``images_per_s``, ``ms_per_step``, ``compile_s``, ``gflops_per_s``,
    ``min_ms``, ``cpu_ms_per_step``), ``device`` (the platform of the device the steps run on, JAX's first),
    ``device_kind`` (its model, e.g. ``NVIDIA H100 80GB HBM3``), ``device_count`` (the devices JAX sees; the
    steps run on one), ``batch_size``, ``model``, ``width``, ``dtype``, ``conv_impl``, ``xla_options``, ``threads``,
    ``flops_per_step``, ``flops_method``, ``load_average``, and with ``compare_torch`` also ``torch`` and
    ``ratio_vs_torch``.
    """
    images, labels = random_batch(batch_size)
    load_before = _load_average()
    devices = jax.devices()
    result: dict[str, Any] = {
        **describe_devices(devices),
        "batch_size": batch_size,
        "model": model,
        "width": width,
        "dtype": dtype,
        "conv_impl": backend.describe_conv(conv_impl, devices[:1]),
        "xla_options": backend.compiler_options(xla_cpu_conv),
        "threads": _threads(),
        "flops_method": FLOPS_METHOD,
    }
    result.update(bench_jax(model, width, batch_size, dtype, conv_impl, steps_, warmup, images, labels, xla_cpu_conv))
    if compare_torch:
        result["torch"] = bench_torch(
            model, width, batch_size, dtype, steps_, warmup, images, labels, threads=result["threads"]
        )
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
        description="Time the jitted train and eval steps (images/s, ms/step, compile s, GFLOP/s) on one "
        "random batch, optionally against a PyTorch eager model of the same architecture.",
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
        help="Compute dtype; params stay float32 (PyTorch: CPU autocast). (default: %(default)s)",
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
        help="Also time a PyTorch eager model of the same architecture on the same batch (needs torch).",
    )
    parser.add_argument(
        "--json", action="store_true", help="End the output with the result as one JSON line (the last line)."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (0 ok; bad flags exit 2, a missing torch exits 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    minimums = {"--width": (args.width, 1), "--batch-size": (args.batch_size, 1), "--steps": (args.steps, 1)}
    minimums["--warmup"] = (args.warmup, 0)
    for flag, (value, low) in minimums.items():
        if value < low:
            parser.error(f"argument {flag}: must be >= {low}, got {value}")
    return cli.run_command(PROG, lambda: _bench(args), lambda: "nothing measured is kept (the bench writes no files)")


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
            import torch  # noqa: F401
        except ImportError:
            raise DataError("--compare-torch needs PyTorch: pip install torch") from None
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
    )
    print(format_table(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    interrupts.exit_with(main)
