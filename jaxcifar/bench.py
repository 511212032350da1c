"""``python -m jaxcifar.bench``: speed of the jitted train and eval steps, optionally against PyTorch.

Builds the model and optimizer as training does (``models.get_model``, ``jaxcifar.optim``,
``jaxcifar.state.create_train_state``), compiles ``jaxcifar.steps.make_train_step`` (on-device
crop-flip augmentation, normalization, forward, backward, SGD update) and ``make_eval_step``
ahead of time on one random uint8 batch, runs ``--warmup`` steps, then times ``--steps`` steps one
by one (each waits for its result). It reports per step the median wall time, images/s, the CPU
time of this process (stable when other programs share the machine; about cores x wall time when
they don't), the compile time, the achieved GFLOP/s and the MFU (``jaxcifar.measure``: the analytic
FLOP count and the devices' peaks).

The model's flags (``--model``, ``--width``, ``--batch-size``, ``--dtype``, ``--conv-impl``, and ``--config``
to take them from a run's config.json) are training's, from ``cli.add_config_flags``; what is timed is a
``BenchSpec``. ``--compare-torch`` also times a PyTorch model of the same architecture doing the same steps
on the same images in this process (``jaxcifar.torch_bench``); PyTorch is optional and imported only then.
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
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from jaxcifar import backend, cli, models, network, optim, sizing, steps, torch_bench, torch_fast
from jaxcifar.config import Config
from jaxcifar.data import NORMALIZATION
from jaxcifar.errors import DataError
from jaxcifar.measure import (
    AUGMENT,
    FLOPS_METHOD,
    BenchSpec,
    count_flops,
    peak_flops,
    random_batch,
    summary,
    time_steps,
)
from jaxcifar.state import create_train_state

PROG = "python -m jaxcifar.bench"
CONFIG_FLAGS = ("model", "width", "batch_size", "dtype", "conv_impl")  # the bench's flags that are Config fields
DEFAULT_SPEC = BenchSpec()
DEFAULT_BATCH_SIZE = DEFAULT_SPEC.batch_size  # the bench's --batch-size default (training's is Config.batch_size)


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


def describe_devices(devices: Sequence[Any]) -> dict[str, Any]:
    """Returns ``{"device": platform, "device_kind": model, "device_count": len(devices)}``: the first of
    ``devices`` (the one the bench runs on) and how many there are."""
    return {"device": devices[0].platform, "device_kind": devices[0].device_kind, "device_count": len(devices)}


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def bench_jax(
    spec: BenchSpec, images: np.ndarray, labels: np.ndarray, peak_flops_per_s: float | None = None
) -> dict[str, Any]:
    """Compiles and times the train and eval steps of ``spec.config()`` on ``images`` (uint8 (B, 32, 32, 3)) and
    ``labels`` (B,) (XLA options ``backend.compiler_options(spec.xla_cpu_conv)``).
    Returns ``{"train": {...}, "eval": {...}, "flops_per_step": {...}}``.

    Each part holds ``images_per_s``, ``ms_per_step`` (median), ``compile_s``, ``gflops_per_s``,
    ``min_ms``, ``cpu_ms_per_step`` and ``mfu`` (against ``peak_flops_per_s``; None without it).
    """
    config = spec.config()
    model = network.build_model(config, jax.devices()[:1])  # compute dtype: models.COMPUTE_DTYPES[dtype]
    tx = optim.make_optimizer(config, optax.constant_schedule(0.01))
    state = create_train_state(model, tx, seed=0)
    mean, std = NORMALIZATION["cifar10"]
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    eval_batch = {**batch, "mask": jax.device_put(np.ones(spec.batch_size, bool))}
    eval_flops, train_flops = count_flops(model, spec.batch_size)

    options = backend.compiler_options(spec.xla_cpu_conv)
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

    train = time_steps(run_train, spec.steps, spec.warmup)
    evaluation = time_steps(run_eval, spec.steps, spec.warmup)
    return {
        "train": summary(train, spec.batch_size, train_flops, round(train_compile, 2), peak_flops_per_s),
        "eval": summary(evaluation, spec.batch_size, eval_flops, round(eval_compile, 2), peak_flops_per_s),
        "flops_per_step": {"train": train_flops, "eval": eval_flops},
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
    if result.get("torch"):
        lines += [row("torch train", result["torch"]["train"]), row("torch eval", result["torch"]["eval"])]
        lines += _torch_lines(result)
    return "\n".join(lines)


def _torch_lines(result: dict[str, Any]) -> list[str]:
    """Returns the table's lines about the PyTorch side of a ``--compare-torch`` result (below its rows)."""
    lines = []
    t = result["torch"]
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
    return lines


def _platform_version(device: Any) -> str:
    try:
        return str(device.client.platform_version)
    except AttributeError:
        return "unknown"


def run(spec: BenchSpec = DEFAULT_SPEC) -> dict[str, Any]:
    """Runs the benchmark of ``spec`` and returns its result dict (the ``--json`` line).

    Keys: ``train``/``eval`` (each ``images_per_s``, ``ms_per_step``, ``compile_s``, ``gflops_per_s``,
    ``min_ms``, ``cpu_ms_per_step``, ``mfu``), ``device`` (the platform of the device the steps run on, JAX's
    first), ``device_kind`` (its model, e.g. ``NVIDIA H100 80GB HBM3``), ``device_count`` (the devices JAX sees;
    the steps run on one), ``platform_version`` (e.g. the CUDA version XLA was built for), ``versions``
    (python, jax, jaxlib, flax, numpy), ``peak`` (``peak_flops``: ``flops_per_s`` or None, ``basis``),
    ``jax_default_matmul_precision``, ``batch_size``, ``model``, ``width``, ``dtype``, ``conv_impl``, ``augment``,
    ``xla_options``, ``threads``, ``flops_per_step``, ``flops_method``, ``load_average``,
    ``xla_python_client_preallocate`` (the environment variable), and with ``spec.compare_torch`` also ``torch``
    (``torch_bench.bench_torch``'s dict: the same per-part keys, its device, versions, peak, compile) and
    ``ratio_vs_torch``.
    """
    images, labels = random_batch(spec.batch_size)
    load_before = _load_average()
    devices = jax.devices()
    precision = jax.config.jax_default_matmul_precision
    result: dict[str, Any] = {
        **describe_devices(devices),
        "platform_version": _platform_version(devices[0]),
        "versions": versions(),
        "peak": peak_flops(devices[0].device_kind, spec.dtype, full_float32=_full_float32_in_jax()),
        "jax_default_matmul_precision": None if precision is None else str(precision),
        "batch_size": spec.batch_size,
        "model": spec.model,
        "width": spec.width,
        "dtype": spec.dtype,
        "conv_impl": backend.describe_conv(spec.conv_impl, devices[:1], spec.model),
        "augment": AUGMENT,
        "xla_options": backend.compiler_options(spec.xla_cpu_conv),
        "threads": _threads(),
        "flops_method": FLOPS_METHOD,
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
    }
    result.update(bench_jax(spec, images, labels, peak_flops_per_s=result["peak"]["flops_per_s"]))
    if spec.compare_torch:
        result["torch"] = torch_bench.bench_torch(
            spec, images, labels, threads=result["threads"], jax_platform=result["device"]
        )
        result["versions"]["torch"] = result["torch"]["version"]
        result["ratio_vs_torch"] = {
            part: round(result[part]["images_per_s"] / result["torch"][part]["images_per_s"], 3)
            for part in ("train", "eval")
        }
    result["load_average"] = {"before": load_before, "after": _load_average()}
    return result


def build_parser() -> cli.ArgumentParser:
    """Returns the parser of ``python -m jaxcifar.bench``: training's flags for the model (``CONFIG_FLAGS``,
    ``--config``) and the bench's own."""
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Time the jitted train and eval steps (images/s, ms/step, compile s, GFLOP/s, MFU) on one "
        "random batch, optionally against a PyTorch model of the same architecture. --model, --width, --batch-size "
        "(here: images per train and per eval step), --dtype (PyTorch: autocast) and --conv-impl are training's "
        "flags; --config takes them from a config file (e.g. a run's config.json).",
    )
    others = [f.name for f in dataclasses.fields(Config) if f.name not in CONFIG_FLAGS]
    cli.add_config_flags(parser, exclude=others)
    parser.set_defaults(batch_size=DEFAULT_BATCH_SIZE)
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
        choices=torch_bench.TORCH_DEVICES,
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


def parse_spec(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[BenchSpec, argparse.Namespace]:
    """Returns the ``BenchSpec`` of ``argv`` and the parsed flags; a bad value exits 2 with one line."""
    config = cli.parse_config(parser, argv)  # --config first, then the flags; Config checks the model's values
    args = parser.parse_args(argv)  # the bench's own flags (after --config set the parser's defaults)
    for flag, value, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            parser.error(f"argument {flag}: must be >= {low}, got {value}")
    if not args.compare_torch:
        for flag, given in (("--torch-compile", args.torch_compile), ("--torch-device", args.torch_device != "auto")):
            if given:
                parser.error(f"argument {flag}: needs --compare-torch")
    elif not hasattr(models.get_model(config.model), "stage_sizes") and config.model not in torch_fast.TWINS:
        parser.error(f"argument --compare-torch: no PyTorch twin of {config.model} yet")
    spec = BenchSpec(
        **{name: getattr(config, name) for name in CONFIG_FLAGS},
        steps=args.steps,
        warmup=args.warmup,
        xla_cpu_conv=args.xla_cpu_conv,
        compare_torch=args.compare_torch,
        torch_device=args.torch_device,
        torch_compile=args.torch_compile,
    )
    return spec, args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (0 ok; bad flags exit 2, a missing torch or a failed torch.compile
    exits 1)."""
    spec, args = parse_spec(build_parser(), argv)
    if spec.compare_torch:
        # Both libraries share the GPU: JAX would otherwise take 75 % of its memory when its backend starts
        # (the first jax.devices() below); a value set by the user is kept. No effect once JAX has started.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return cli.run_command(
        PROG,
        lambda: _bench(spec, print_json=args.json),
        lambda: "nothing measured is kept (the bench writes no files)",
        f"try a smaller --batch-size (now {spec.batch_size})",
    )


def _bench(spec: BenchSpec, print_json: bool) -> int:
    sizing.check_fits(spec.config(), models.get_model(spec.model, width=spec.width), jax.devices()[:1])
    if spec.compare_torch:
        try:
            import torch
        except ImportError:
            raise DataError("--compare-torch needs PyTorch: pip install torch") from None
        torch_bench.select_torch_device(torch, spec.torch_device, jax.devices()[0].platform)  # before any timing
    result = run(spec)
    print(format_table(result), flush=True)
    if print_json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    interrupts.exit_with(main)
