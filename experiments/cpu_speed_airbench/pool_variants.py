"""Max-pool variants at airbench's batch-512 pool shapes: forward + backward of ``sum(pool(gelu(z))**2)``,
jitted with ``backend.compiler_options()``, 7 alternating rounds, median ms. Every variant's gradient is checked
against flax's (except ``reshape``, whose gradient splits ties). Variants: ``flax`` (nn.max_pool, XLA's
select-and-scatter), ``reshape`` (jnp.max over a reshape: the code before this change), and custom VJPs that
keep each window's arg-max and put the cotangent on it, differing in how the forward finds the arg-max:
``variadic`` (one lax.reduce over (value, position) pairs), ``variadic8`` (int8 positions), ``eqmin`` (max,
then the smallest position equal to it), ``argmax2`` (two single-axis argmaxes), ``slices`` (a running max over
the window positions: what ``models.conv.max_pool`` does).

    python experiments/cpu_speed_airbench/pool_variants.py flax,reshape,variadic,slices [first shape index]
"""

from __future__ import annotations

import functools
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcifar import backend
from jaxcifar.models import conv as mconv
from jaxcifar.models.airbench import gelu


def windows(x, s):
    b, h, w, c = x.shape
    ho, wo = h // s, w // s
    return x[:, : ho * s, : wo * s, :].reshape(b, ho, s, wo, s, c)


def unwindows(d6, shape):
    b, h, w, c = shape
    _, ho, s, wo, _, _ = d6.shape
    d = d6.reshape(b, ho * s, wo * s, c)
    return jnp.pad(d, ((0, 0), (0, h - ho * s), (0, w - wo * s), (0, 0)))


def pos6(shape6, dtype=jnp.int32):
    s = shape6[2]
    return lax.broadcasted_iota(dtype, shape6, 2) * s + lax.broadcasted_iota(dtype, shape6, 4)


def make(fwd_idx):
    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def pool(x, s):
        return jnp.max(windows(x, s), axis=(2, 4))

    def f(x, s):
        y, idx = fwd_idx(windows(x, s))
        return y, (idx, x.shape)

    def b(s, res, g):
        idx, shape = res
        b_, ho, wo, c = g.shape
        hit = pos6((b_, ho, s, wo, s, c), idx.dtype) == idx[:, :, None, :, None, :]
        d6 = jnp.where(hit, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
        return (unwindows(d6, shape),)

    pool.defvjp(f, b)
    return pool


def _first_max(a, b):
    (av, ai), (bv, bi) = a, b
    take_a = (av > bv) | ((av == bv) & (ai < bi))
    return lax.select(take_a, av, bv), lax.select(take_a, ai, bi)


def idx_variadic(x6, dtype=jnp.int32):
    init = (jnp.array(-jnp.inf, x6.dtype), jnp.array(0, dtype))
    return lax.reduce((x6, pos6(x6.shape, dtype)), init, _first_max, (2, 4))


def idx_eqmin(x6):
    y = jnp.max(x6, axis=(2, 4))
    s2 = x6.shape[2] * x6.shape[4]
    idx = jnp.min(jnp.where(x6 == y[:, :, None, :, None, :], pos6(x6.shape), s2), axis=(2, 4))
    return y, jnp.minimum(idx, s2 - 1)


def idx_argmax2(x6):
    s = x6.shape[2]
    a1 = jnp.argmax(x6, axis=4)
    m1 = jnp.max(x6, axis=4)
    a2 = jnp.argmax(m1, axis=2)
    y = jnp.max(m1, axis=2)
    sel = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, a1.shape, 2) == a2[:, :, None], a1, 0), axis=2)
    return y, a2 * s + sel


def idx_slices(x6):
    s = x6.shape[2]
    best = x6[:, :, 0, :, 0, :]
    arg = jnp.zeros(best.shape, jnp.int32)
    for i in range(s):
        for j in range(s):
            if i == j == 0:
                continue
            v = x6[:, :, i, :, j, :]
            take = (v > best) | (v != v)
            best = jnp.where(take, v, best)
            arg = jnp.where(take, i * s + j, arg)
    return best, arg


VARIANTS = {
    "flax": lambda x, s: nn.max_pool(x, (s, s), strides=(s, s)),
    "reshape": lambda x, s: jnp.max(windows(x, s), axis=(2, 4)),
    "committed": mconv.max_pool,
    "variadic": make(idx_variadic),
    "variadic8": make(functools.partial(idx_variadic, dtype=jnp.int8)),
    "eqmin": make(idx_eqmin),
    "argmax2": make(idx_argmax2),
    "slices": make(idx_slices),
}
SHAPES = [((512, 31, 31, 64), 2), ((512, 15, 15, 256), 2), ((512, 7, 7, 256), 2), ((512, 3, 3, 256), 3)]


def main() -> None:
    names = sys.argv[1].split(",")
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    rng = np.random.default_rng(0)
    for shape, s in SHAPES[first:]:
        z = jnp.asarray(rng.normal(size=shape).astype(np.float32))
        fns = {}
        for n in names:

            def loss(z, pool=VARIANTS[n], s=s):
                y = pool(gelu(z), s)
                return jnp.sum(y * y)

            fns[n] = jax.jit(jax.value_and_grad(loss), compiler_options=backend.compiler_options())
        ref = jax.jit(jax.grad(lambda z, s=s: jnp.sum(VARIANTS["flax"](gelu(z), s) ** 2)))(z)
        for n in names:
            if n != "reshape":
                np.testing.assert_allclose(fns[n](z)[1], ref, rtol=1e-5, atol=1e-6)
        times = {n: [] for n in names}
        for _ in range(7):
            for n in names:
                t = time.perf_counter()
                jax.block_until_ready(fns[n](z))
                times[n].append(time.perf_counter() - t)
        print(shape, s, "  ".join(f"{n} {1000 * np.median(times[n]):.1f}" for n in names), flush=True)


if __name__ == "__main__":
    main()
