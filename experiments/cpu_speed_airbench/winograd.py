"""Winograd F(2x2, 3x3) against XLA's (Eigen) convolution for airbench's 3x3 shapes, forward + backward, on XLA:CPU.

Winograd's algorithm (Lavin & Gray 2015) computes each 2x2 output tile of a 3x3 convolution from a 4x4 input tile
with 16 multiplications per (C_in, C_out) pair instead of 36: the input tiles and the kernel are transformed
(B^T d B, G g G^T), multiplied as 16 batched matmuls (tiles x C_in) @ (C_in x C_out), and transformed back
(A^T m A). All three transforms are linear, so JAX's autodiff of it is again a Winograd computation (two more
batched matmuls per gradient). This script times one forward + both gradients against
``lax.conv_general_dilated`` under the project's compiler options (Eigen convolutions, YNNPACK dots), checks the
results agree, and times the batched matmul alone (the part Winograd shrinks). An experiment only: the library
does not use it (see README, run 6).

    python experiments/cpu_speed_airbench/winograd.py --batch-size 512 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar import backend
from jaxcifar.models import conv as mconv

B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # input transform
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)  # kernel transform
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))  # output transform
SHAPES = {  # name: (H=W, C_in, C_out), airbench94's 3x3 convolutions
    "24->64@31": (31, 24, 64),
    "64->64@15": (15, 64, 64),
    "64->256@15": (15, 64, 256),
    "256->256@7": (7, 256, 256),
    "256->256@3": (3, 256, 256),
}


def _combine(matrix: tuple[tuple[int, ...], ...], items: list[jax.Array]) -> list[jax.Array]:
    """Returns [sum_j matrix[i][j] * items[j] for each row i], skipping zeros (the entries are 0 or +-1)."""
    rows = []
    for row in matrix:
        terms = [item if c == 1 else -item for c, item in zip(row, items, strict=True) if c != 0]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        rows.append(total)
    return rows


def winograd_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Returns the 3x3 "same" (padding 1, stride 1) convolution (B, H, W, C_out) of ``x`` (B, H, W, C_in) with the
    HWIO ``kernel`` by Winograd F(2x2, 3x3), equal to ``lax.conv_general_dilated``'s up to rounding."""
    n, h, w, c_in = x.shape
    c_out = kernel.shape[-1]
    th, tw = -(-h // 2), -(-w // 2)  # output tiles per column and row (odd sizes padded by one)
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    d = [[xp[:, i : i + 2 * th : 2, j : j + 2 * tw : 2, :] for j in range(4)] for i in range(4)]
    rows = [_combine(B_T, [d[i][j] for i in range(4)]) for j in range(4)]  # rows[j][a] = (B^T d)[a, j]
    v = [_combine(B_T, [rows[j][a] for j in range(4)]) for a in range(4)]  # v[a][b] = (B^T d B)[a, b]
    tiles = jnp.stack([v[a][b] for a in range(4) for b in range(4)]).reshape(16, n * th * tw, c_in)
    u = jnp.einsum("ai,ijck,bj->abck", G, kernel, G).reshape(16, c_in, c_out)
    m = jnp.einsum("ptc,pck->ptk", tiles, u).reshape(4, 4, n, th, tw, c_out)
    cols = [_combine(A_T, [m[a, b] for a in range(4)]) for b in range(4)]  # cols[b][r] = (A^T m)[r, b]
    y = [_combine(A_T, [cols[b][r] for b in range(4)]) for r in range(2)]  # y[r][s] = (A^T m A)[r, s]
    out = jnp.stack([jnp.stack(y[r], axis=3) for r in range(2)], axis=2)  # (n, th, 2, tw, 2, c_out)
    return out.reshape(n, 2 * th, 2 * tw, c_out)[:, :h, :w, :]


def lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's own convolution, as the models run it (``--conv-impl lax``)."""
    return mconv._lax_conv(x, kernel, (1, 1), ((1, 1), (1, 1)))


def forward_backward(conv):
    """Returns jit(x, kernel, g -> (sum(conv(x, kernel) * g), (dx, dkernel))) with the project's CPU options."""
    return jax.jit(
        jax.value_and_grad(lambda x, k, g: jnp.sum(conv(x, k) * g), argnums=(0, 1)),
        compiler_options=backend.compiler_options(),
    )


def median_ms(fn, *args, rounds: int) -> float:
    """Median wall time of ``fn(*args)`` in ms over ``rounds`` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=512, help="images per convolution call")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per variant (alternating)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    variants = {"lax": forward_backward(lax_conv), "winograd": forward_backward(winograd_conv)}
    for name in args.shapes.split(","):
        hw, c_in, c_out = SHAPES[name]
        x = jnp.asarray(rng.standard_normal((args.batch_size, hw, hw, c_in), np.float32))
        kernel = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out), np.float32) / np.sqrt(9 * c_in))
        g = jnp.asarray(rng.standard_normal((args.batch_size, hw, hw, c_out), np.float32))
        ref = jax.tree.leaves(variants["lax"](x, kernel, g))
        got = jax.tree.leaves(variants["winograd"](x, kernel, g))
        errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, ref, strict=True)]
        times = {key: [] for key in variants}
        for _ in range(args.rounds):  # alternate, so both variants share the machine's state
            for key, fn in variants.items():
                times[key].append(median_ms(fn, x, kernel, g, rounds=1))
        lax_ms, wino_ms = statistics.median(times["lax"]), statistics.median(times["winograd"])
        print(
            f"{name:11s} B={args.batch_size} fwd+bwd: lax {lax_ms:7.1f} ms | winograd {wino_ms:7.1f} ms "
            f"({lax_ms / wino_ms:.2f}x) | max rel. error (loss, dx, dw) {', '.join(f'{e:.1e}' for e in errors)}",
            flush=True,
        )
    # the part Winograd shrinks: the 16 batched matmuls of 64->64@15, against XLA's convolution forward
    hw, c_in, c_out = SHAPES["64->64@15"]
    tiles = 16, args.batch_size * ((hw + 1) // 2) ** 2
    v = jnp.asarray(rng.standard_normal((*tiles, c_in), np.float32))
    u = jnp.asarray(rng.standard_normal((16, c_in, c_out), np.float32))
    x = jnp.asarray(rng.standard_normal((args.batch_size, hw, hw, c_in), np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out), np.float32))
    options = backend.compiler_options()
    dot_ms = median_ms(jax.jit(lambda a, b: jnp.einsum("ptc,pck->ptk", a, b), compiler_options=options), v, u, rounds=5)
    conv_ms = median_ms(jax.jit(lax_conv, compiler_options=options), x, kernel, rounds=5)
    dot_gflop = 2 * tiles[0] * tiles[1] * c_in * c_out / 1e9
    conv_gflop = 2 * args.batch_size * hw * hw * 9 * c_in * c_out / 1e9
    print(
        f"64->64@15 forward alone: lax convolution {conv_ms:.1f} ms ({conv_gflop / conv_ms * 1e3:.0f} GFLOP/s); "
        f"Winograd's 16 batched matmuls {dot_ms:.1f} ms ({dot_gflop / dot_ms * 1e3:.0f} GFLOP/s, "
        f"{dot_gflop:.1f} of the convolution's {conv_gflop:.1f} GFLOP)"
    )


if __name__ == "__main__":
    main()
