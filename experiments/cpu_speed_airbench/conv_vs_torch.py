"""Per-convolution times of airbench's 3x3 convolutions (width 64, batch 512) in XLA:CPU and in PyTorch eager:
the forward, the input gradient and the weight gradient, each timed alone.

JAX: ``lax.conv_general_dilated`` NHWC, each part its own jitted function (the input and weight gradients as
``jax.vjp`` of the convolution in one argument), compiled with ``jaxcifar.backend.compiler_options()`` (Eigen
convolutions, what the train step uses). PyTorch: ``F.conv2d`` on channels_last tensors and
``torch.ops.aten.convolution_backward`` with one output mask each (what autograd calls), 2 threads.
Each library runs in its own process (an idle thread pool of the other slows it), alternating per round;
prints the median ms over the rounds of each part's median of ``--steps`` calls, the GFLOP/s
(2 x multiply-adds) and jax / torch as a speed ratio (> 1 = JAX faster).

    python experiments/cpu_speed_airbench/conv_vs_torch.py --rounds 3    # output: conv_vs_torch.txt
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [  # (H=W, C_in, C_out): airbench94's convolutions at width 64, in network order (256->256 @7 twice)
    (31, 24, 64),
    (15, 64, 64),
    (15, 64, 256),
    (7, 256, 256),
    (7, 256, 256),
    (3, 256, 256),
]
PARTS = ("fwd", "dx", "dw")


def _median_ms(fn, steps: int) -> float:
    fn()  # warm-up (compiles on the JAX side)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _run_jax(compiled, x, k, g) -> None:
    compiled(x, k, g).block_until_ready()


def time_jax(batch: int, steps: int) -> list[dict[str, float]]:
    """Returns, per shape, ``{part: median ms}`` for XLA:CPU."""
    import jax
    from jax import lax

    from jaxcifar import backend

    dn = ("NHWC", "HWIO", "NHWC")
    options = backend.compiler_options()

    def conv(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

    functions = {
        "fwd": lambda x, k, g: conv(x, k),
        "dx": lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0],
        "dw": lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0],
    }
    rows = []
    for hw, c_in, c_out in SHAPES:
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (batch, hw, hw, c_in))
        k = jax.random.normal(keys[1], (3, 3, c_in, c_out))
        g = jax.random.normal(keys[2], (batch, hw, hw, c_out))
        row = {}
        for part, fn in functions.items():
            compiled = jax.jit(fn).lower(x, k, g).compile(options)
            row[part] = _median_ms(functools.partial(_run_jax, compiled, x, k, g), steps)
        rows.append(row)
    return rows


def time_torch(batch: int, steps: int) -> list[dict[str, float]]:
    """Returns, per shape, ``{part: median ms}`` for PyTorch eager (channels_last, float32)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", os.cpu_count() or 1)))
    cl = torch.channels_last
    rows = []
    with torch.no_grad():
        for hw, c_in, c_out in SHAPES:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, c_in, hw, hw, generator=gen).to(memory_format=cl)
            k = torch.randn(c_out, c_in, 3, 3, generator=gen).to(memory_format=cl)
            g = torch.randn(batch, c_out, hw, hw, generator=gen).to(memory_format=cl)

            def backward(mask, g=g, x=x, k=k):
                return torch.ops.aten.convolution_backward(
                    g, x, k, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
                )

            functions = {
                "fwd": lambda x=x, k=k: F.conv2d(x, k, padding=1),
                "dx": lambda: backward([True, False, False]),
                "dw": lambda: backward([False, True, False]),
            }
            rows.append({part: _median_ms(fn, steps) for part, fn in functions.items()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed calls per part in each round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two processes")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.side:
        timer = time_jax if args.side == "jax" else time_torch
        print(json.dumps(timer(args.batch_size, args.steps)))
        return
    runs: dict[str, list] = {"jax": [], "torch": []}
    for round_ in range(args.rounds):
        for side in ("jax", "torch"):
            sizes = ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            out = subprocess.run(
                [sys.executable, __file__, "--side", side, *sizes],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {side} done, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"batch {args.batch_size}, {args.rounds} rounds x {args.steps} calls, median ms (GFLOP/s), jax/torch speed")
    print(f"{'shape':16}" + "".join(f"{p + ' jax':>16}{p + ' torch':>16}{'ratio':>7}" for p in PARTS))
    totals = {(s, p): 0.0 for s in runs for p in PARTS}
    for i, (hw, c_in, c_out) in enumerate(SHAPES):
        gflop = 2 * args.batch_size * hw * hw * 9 * c_in * c_out / 1e9
        line = f"{f'{c_in}->{c_out} @{hw}':16}"
        for part in PARTS:
            ms = {s: statistics.median(r[i][part] for r in runs[s]) for s in runs}
            for s in runs:
                totals[s, part] += ms[s]
            line += "".join(f"{ms[s]:8.1f} ({gflop / ms[s] * 1e3:5.0f})" for s in ("jax", "torch"))
            line += f"{ms['torch'] / ms['jax']:7.2f}"
        print(line)
    line = f"{'sum':16}"
    for part in PARTS:
        jax_ms, torch_ms = totals["jax", part], totals["torch", part]
        line += f"{jax_ms:16.1f}{torch_ms:16.1f}{torch_ms / jax_ms:7.2f}"
    print(line)
    jax_all = sum(totals["jax", p] for p in PARTS)
    torch_all = sum(totals["torch", p] for p in PARTS)
    print(
        f"all parts: jax {jax_all:.0f} ms, torch {torch_all:.0f} ms, ratio {torch_all / jax_all:.2f}"
        " (the first layer's dx is not needed in a train step)"
    )


if __name__ == "__main__":
    main()
