"""Per-convolution forward+backward time of airbench's and resnet9's 3x3 convolutions under XLA:CPU, for
each way of computing the forward (fwd), input gradient (dx) and weight gradient (dw): ``lax`` (XLA's
convolution) or ``mm`` (jaxcifar.models.conv's im2col matmuls: matmul_conv, matmul_input_grad,
weight_grad), with the Eigen convolution option (backend.compiler_options) or YNNPACK's (``ynn``).

Variants are timed alternately in one process (rounds), so they share the contention of the 2-core machine;
prints the median ms of each and its ratio to ``lax`` (plain XLA with the Eigen option).

    python experiments/cpu_speed_airbench/conv_variants.py --batch-size 128 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxcifar import backend
from jaxcifar.models import conv as mconv

PAD = ((1, 1), (1, 1))
SHAPES = {  # name: (H=W, C_in, C_out)
    "ab 24->64 @31": (31, 24, 64),
    "ab 64->64 @15": (15, 64, 64),
    "ab 64->256 @15": (15, 64, 256),
    "ab 256->256 @7": (7, 256, 256),
    "ab 256->256 @3": (3, 256, 256),
    "r9 3->64 @32": (32, 3, 64),
    "r9 64->128 @32": (32, 64, 128),
    "r9 128->128 @16": (16, 128, 128),
    "r9 128->256 @16": (16, 128, 256),
    "r9 256->512 @8": (8, 256, 512),
    "r9 512->512 @4": (4, 512, 512),
}


def composed(fwd: str, dx: str, dw: str):
    """Returns conv(x, kernel) with the chosen forward / input-gradient / weight-gradient computations."""

    def forward(x, k):
        if fwd == "mm":
            return mconv.matmul_conv(x, k, PAD)
        return mconv._lax_conv(x, k, (1, 1), PAD)

    @jax.custom_vjp
    def conv(x, k):
        return forward(x, k)

    def conv_fwd(x, k):
        return forward(x, k), (x, k)

    def conv_bwd(res, g):
        x, k = res
        if dx == "mm":
            gx = mconv.matmul_input_grad(k, g, x.shape, PAD)
        else:
            gx = mconv.input_grad(k, g, x.shape, (1, 1), PAD)
        if dw == "mm":
            gk = mconv.weight_grad(x, g, k.shape[:2], (1, 1), PAD)
        else:
            gk = jax.vjp(lambda k_: mconv._lax_conv(x, k_, (1, 1), PAD), k)[1](g)[0]
        return gx, gk.astype(k.dtype)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv


def step_fn(conv, what: str):
    if what == "fwd":
        return lambda x, k, r: jnp.vdot(conv(x, k), r)
    return jax.grad(lambda x, k, r: jnp.vdot(conv(x, k), r), argnums=(0, 1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--what", default="fwdbwd", choices=("fwd", "fwdbwd"))
    p.add_argument("--shapes", default="", help="comma-separated substrings of shape names (default: all)")
    p.add_argument("--variants", default="lax,ynn,lax/lax/mm,lax/mm/mm,mm/mm/mm,mm/lax/mm")
    args = p.parse_args()
    eigen = backend.compiler_options("eigen")
    for name, (hw, c_in, c_out) in SHAPES.items():
        if args.shapes and not any(s in name for s in args.shapes.split(",")):
            continue
        kx, kk, kr = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (args.batch_size, hw, hw, c_in))
        k = jax.random.normal(kk, (3, 3, c_in, c_out)) * 0.05
        r = jax.random.normal(kr, (args.batch_size, hw, hw, c_out))
        fns = {}
        for v in args.variants.split(","):
            parts = {"lax": ("lax", "lax", "lax"), "ynn": ("lax", "lax", "lax")}.get(v) or tuple(v.split("/"))
            options = {} if v == "ynn" else eigen
            fn = jax.jit(step_fn(composed(*parts), args.what), compiler_options=options).lower(x, k, r).compile()
            jax.block_until_ready(fn(x, k, r))
            fns[v] = fn
        times = {v: [] for v in fns}
        for _ in range(args.rounds):
            for v, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, k, r))
                times[v].append((time.perf_counter() - t0) * 1000)
        base = statistics.median(times["lax"]) if "lax" in times else None
        cells = []
        for v, ts in times.items():
            m = statistics.median(ts)
            cells.append(f"{v} {m:7.1f}" + (f" ({base / m:4.2f}x)" if base else ""))
        print(f"{name:18s} B={args.batch_size} {args.what}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
