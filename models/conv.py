"""2-D convolution with a custom gradient that XLA:CPU runs faster: a model concern, no platform policy.

A ResNet train step on CPU is nearly all convolutions: forward, input gradient and weight gradient.
``CustomGradConv`` is a drop-in ``jax.lax.conv_general_dilated`` (hand it to
``flax.linen.Conv(conv_general_dilated=...)``: the module's parameters do not change) whose VJP

- computes the weight gradient as a matmul: ``dW[i, j] = sum over (b, h, w) of patch(x)[b, h, w, (i, j, c)]
  * g[b, h, w, o]``, the patches taken (im2col) ``block_bytes`` at a time inside a loop, so that each
  patch block stays in the CPU cache, accumulated in float32 (``block_bytes=None``: one matmul over
  the whole batch, for a batch sharded over several devices, where a loop of collectives deadlocked
  XLA:CPU);
- splits the input gradient of a strided convolution into stride-1 convolutions, one per residue
  class (polyphase), instead of convolving a zero-dilated ``g``.

Which convolutions take the custom gradient is the caller's choice (``min_flops``, ``min_out_pixels``);
``jaxcifar.backend`` chooses per platform, from measurements kept in ``experiments/cpu_conv``.
The custom VJP defines a VJP only: forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) of a
model using it raises an error; build the model with ``lax.conv_general_dilated`` for that.

Also here, for XLA:CPU: ``matmul_conv`` and ``matmul_input_grad`` (a stride-1 forward and input gradient
as im2col matmuls; measured in experiments/cpu_speed_airbench, not routed by default) and ``max_pool`` (a
max-pool whose gradient is elementwise, used by the resnet9 and airbench models).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# Patch block size of the weight gradient: images per loop iteration are chosen so that one block of
# patches, (images x Ho x Wo) rows of (kh x kw x C_in) values, holds about this many bytes (1 image minimum).
PATCH_BLOCK_BYTES = 4 * 2**20

Padding = Sequence[tuple[int, int]]
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Padding,
    block_bytes: int | None = PATCH_BLOCK_BYTES,
) -> jax.Array:
    """NHWC x HWIO convolution with explicit padding and the custom VJP (``weight_grad``, ``input_grad``).

    ``x`` (B, H, W, C_in), ``kernel`` (kh, kw, C_in, C_out), ``padding`` ((top, bottom), (left, right)).
    Returns (B, Ho, Wo, C_out) in the inputs' dtype, equal to ``lax.conv_general_dilated``'s.
    """
    strides = tuple(int(s) for s in strides)
    return _conv(x, kernel, strides, tuple((int(lo), int(hi)) for lo, hi in padding), block_bytes)


def _lax_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], padding: tuple) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def matmul_conv(
    x: jax.Array, kernel: jax.Array, padding: Padding, block_bytes: int | None = PATCH_BLOCK_BYTES
) -> jax.Array:
    """Returns the stride-1 NHWC x HWIO convolution (B, Ho, Wo, C_out) of ``x`` (B, H, W, C_in) as im2col
    matmuls: ``patches(x) @ kernel.reshape(kh * kw * C_in, C_out)``, ``block_bytes`` of patches at a time
    (a loop over image blocks; ``None``: one matmul). Equal to ``lax.conv_general_dilated``'s up to rounding."""
    kh, kw, c_in, c_out = kernel.shape
    (pt, pb), (pl, pr) = padding
    ho, wo = x.shape[1] + pt + pb - kh + 1, x.shape[2] + pl + pr - kw + 1
    batch, cols = x.shape[0], kh * kw * c_in
    per_block = batch if block_bytes is None else _images_per_block(batch, ho * wo, cols, x.dtype.itemsize, block_bytes)
    w = kernel.reshape(cols, c_out).astype(x.dtype)
    pads = ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0))

    def block(xb: jax.Array) -> jax.Array:
        patches = _patches(lax.pad(xb, jnp.zeros((), xb.dtype), pads), (kh, kw), (1, 1), (ho, wo))
        return lax.dot_general(patches, w, (((3,), (0,)), ((), ())))

    if per_block == batch:
        return block(x)
    out = lax.map(block, x.reshape(batch // per_block, per_block, *x.shape[1:]))
    return out.reshape(batch, ho, wo, c_out)


def matmul_input_grad(
    kernel: jax.Array,
    g: jax.Array,
    x_shape: Sequence[int],
    padding: Padding,
    block_bytes: int | None = PATCH_BLOCK_BYTES,
) -> jax.Array:
    """Returns dL/dx (``x_shape``) of a stride-1 ``conv(x, kernel, (1, 1), padding)`` given ``g`` = dL/doutput:
    the stride-1 convolution of ``g``, padded by (k - 1 - pad) before and (H - Ho + pad) after, with the
    flipped, channel-transposed kernel, as ``matmul_conv``."""
    kh, kw = kernel.shape[:2]
    (pt, _), (pl, _) = padding
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)  # (kh, kw, C_out, C_in)
    pads = ((kh - 1 - pt, x_shape[1] - g.shape[1] + pt), (kw - 1 - pl, x_shape[2] - g.shape[2] + pl))
    return matmul_conv(g, flipped, pads, block_bytes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], padding: tuple, block_bytes: int | None
) -> jax.Array:
    return _lax_conv(x, kernel, strides, padding)


def _conv_fwd(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], padding: tuple, block_bytes: int | None
) -> tuple[jax.Array, Any]:
    return _lax_conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(
    strides: tuple[int, ...], padding: tuple, block_bytes: int | None, residuals: Any, g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    dx = input_grad(kernel, g, x.shape, strides, padding)
    dw = weight_grad(x, g, kernel.shape[:2], strides, padding, block_bytes)
    return dx, dw.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _polyphase_applies(x_shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether ``input_grad`` splits this strided convolution's input gradient into stride-1 ones."""
    return any(s > 1 for s in strides) and all(n % s == 0 for n, s in zip(x_shape[1:3], strides, strict=True))


def input_grad(
    kernel: jax.Array, g: jax.Array, x_shape: Sequence[int], strides: Sequence[int], padding: Padding
) -> jax.Array:
    """Returns dL/dx of ``conv(x, kernel, strides, padding)`` given ``g`` = dL/doutput, shape ``x_shape``.

    Stride 1: XLA's own input gradient. Stride s > 1 with input sides divisible by s (the ResNet's
    downsampling convolutions): polyphase. Input pixel ``s * m + r`` only receives contributions from
    the kernel taps ``i`` with ``(r + pad - i) % s == 0``, from output ``m + (r + pad - i) // s``, so
    each of the s x s residue classes is a small stride-1 convolution of ``g`` (with the flipped,
    transposed sub-kernel), and the classes interleave into dx. Same FLOPs as the transposed
    convolution XLA would run on a zero-dilated ``g`` (slower on CPU, experiments/cpu_conv), none on zeros.
    """
    if not _polyphase_applies(x_shape, strides):
        _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, kernel, strides, padding), jnp.zeros(x_shape, g.dtype))
        return input_vjp(g)[0]
    batch, height, width, c_in = x_shape
    (sh, sw), (kh, kw) = strides, kernel.shape[:2]
    kernel_t = jnp.swapaxes(kernel, 2, 3).astype(g.dtype)  # (kh, kw, C_out, C_in): g's channels in
    rows = [_phase_taps(r, padding[0][0], kh, sh, height // sh, g.shape[1]) for r in range(sh)]
    cols = [_phase_taps(r, padding[1][0], kw, sw, width // sw, g.shape[2]) for r in range(sw)]
    phases = []
    for taps_h, pad_h in rows:
        row = []
        for taps_w, pad_w in cols:
            if not taps_h or not taps_w:
                row.append(jnp.zeros((batch, height // sh, width // sw, c_in), g.dtype))
                continue
            sub_kernel = kernel_t[jnp.array(taps_h)][:, jnp.array(taps_w)]
            src = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (*pad_h, 0), (*pad_w, 0), (0, 0, 0)))
            row.append(lax.conv_general_dilated(src, sub_kernel, (1, 1), "VALID", dimension_numbers=_NHWC))
        phases.append(jnp.stack(row, axis=3))  # (B, H/sh, W/sw, sw, C_in)
    return jnp.stack(phases, axis=2).reshape(batch, height, width, c_in)  # (B, H/sh, sh, W/sw, sw, C)


def _phase_taps(residue: int, pad: int, k: int, stride: int, n_out: int, n_g: int) -> tuple[list[int], tuple[int, int]]:
    """Kernel taps feeding input positions ``stride * m + residue`` along one axis, ordered by the
    output offset they read (``g[m + d]``), and the (low, high) padding of ``g`` (negative crops)
    that makes a VALID convolution over ``n_out`` positions read those offsets."""
    offsets = {(residue + pad - i) // stride: i for i in range(k) if (residue + pad - i) % stride == 0}
    if not offsets:
        return [], (0, 0)
    lo, hi = min(offsets), max(offsets)  # consecutive taps i differ by stride: offsets lo..hi, no gaps
    return [offsets[d] for d in range(lo, hi + 1)], (-lo, n_out - 1 + hi - (n_g - 1))


def _images_per_block(batch: int, rows_per_image: int, cols: int, itemsize: int, block_bytes: int) -> int:
    """Returns the largest divisor of ``batch`` whose patch block fits ``block_bytes`` (at least 1)."""
    target = max(1, block_bytes // max(1, rows_per_image * cols * itemsize))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= target) if target < batch else batch


def _patches(x: jax.Array, window: Sequence[int], strides: Sequence[int], out_hw: Sequence[int]) -> jax.Array:
    """Returns the im2col patches of a padded NHWC ``x``: (B, Ho, Wo, kh * kw * C), ordered (i, j, c)."""
    (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
    taps = [
        x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] for i in range(kh) for j in range(kw)
    ]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def weight_grad(
    x: jax.Array,
    g: jax.Array,
    window: Sequence[int],
    strides: Sequence[int],
    padding: Padding,
    block_bytes: int | None = PATCH_BLOCK_BYTES,
) -> jax.Array:
    """Returns dL/dkernel of ``conv(x, kernel, strides, padding)`` given ``g`` = dL/doutput.

    ``x`` (B, H, W, C_in), ``g`` (B, Ho, Wo, C_out); the result is float32 (kh, kw, C_in, C_out),
    a sum of patch-block matmuls of about ``block_bytes`` of patches each, accumulated in float32
    (``block_bytes=None``: one matmul over the whole batch).
    """
    (kh, kw), (sh, sw) = window, strides
    batch, ho, wo, c_out = g.shape
    c_in = x.shape[-1]
    cols = kh * kw * c_in
    per_block = batch if block_bytes is None else _images_per_block(batch, ho * wo, cols, x.dtype.itemsize, block_bytes)
    blocks = batch // per_block
    pt, pl = padding[0][0], padding[1][0]  # the bottom/right padding follows from the output size
    # Rows/columns the windows read: pad where they reach beyond x, crop what they never reach.
    pads = ((0, 0, 0), (pt, sh * (ho - 1) + kh - x.shape[1] - pt, 0), (pl, sw * (wo - 1) + kw - x.shape[2] - pl, 0))
    contract = (((0, 1, 2), (0, 1, 2)), ((), ()))

    def block_grad(xb: jax.Array, gb: jax.Array) -> jax.Array:
        xb = lax.pad(xb, jnp.zeros((), xb.dtype), (*pads, (0, 0, 0)))
        patches = _patches(xb, (kh, kw), (sh, sw), (ho, wo))
        return lax.dot_general(patches, gb, contract, preferred_element_type=jnp.float32)

    if blocks == 1:
        dw = block_grad(x, g)
    else:
        xs = x.reshape(blocks, per_block, *x.shape[1:])
        gs = g.reshape(blocks, per_block, *g.shape[1:])

        def body(acc: jax.Array, xg: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            return acc + block_grad(*xg), None

        dw, _ = lax.scan(body, jnp.zeros((cols, c_out), jnp.float32), (xs, gs))
    return dw.reshape(kh, kw, c_in, c_out)


def _supported(
    lhs: jax.Array,
    rhs: jax.Array,
    padding: Any,
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
        return False
    if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
        return False
    if isinstance(padding, str):
        return False
    try:
        dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return False
    return dims == _NHWC


def _custom_gradient_applies(
    x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int], min_flops: float, min_out_pixels: int
) -> bool:
    """Whether a convolution takes the custom gradient: always for 1x1 kernels; else from ``min_flops``
    forward FLOPs on, when it is strided or its output has more than ``min_out_pixels`` pixels."""
    batch, height, width, c_in = x_shape
    kh, kw, _, c_out = kernel_shape
    if kh * kw == 1:
        return True
    out_pixels = math.ceil(height / strides[0]) * math.ceil(width / strides[1])
    if flops(batch, (out_pixels,), (kh, kw), c_in, c_out) < min_flops:
        return False
    return any(s > 1 for s in strides) or out_pixels > min_out_pixels


@dataclasses.dataclass(frozen=True)
class CustomGradConv:
    """``lax.conv_general_dilated`` with the custom VJP (matmul weight gradient, polyphase strided input
    gradient) for the NHWC/HWIO convolutions it supports (no dilation, no feature groups, explicit
    padding) that ``min_flops`` and ``min_out_pixels`` select (``_custom_gradient_applies``; the
    defaults select all); the rest, and calls with ``precision`` or ``preferred_element_type``, run
    the plain lax convolution. Frozen (hashable), so models built with equal settings compare equal.
    Calling it returns the convolution's output, as ``lax.conv_general_dilated`` does.
    """

    min_flops: float = 0.0
    min_out_pixels: int = 0
    block_bytes: int | None = PATCH_BLOCK_BYTES

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        window_strides: Sequence[int],
        padding: Any,
        lhs_dilation: Sequence[int] | None = None,
        rhs_dilation: Sequence[int] | None = None,
        dimension_numbers: Any = None,
        feature_group_count: int = 1,
        batch_group_count: int = 1,
        precision: Any = None,
        preferred_element_type: Any = None,
    ) -> jax.Array:
        custom = (
            precision is None
            and preferred_element_type is None
            and _supported(
                lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count
            )
            and _custom_gradient_applies(lhs.shape, rhs.shape, window_strides, self.min_flops, self.min_out_pixels)
        )
        if custom:
            return conv(lhs, rhs, window_strides, padding, self.block_bytes)
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )


def flops(batch: int, out_hw: Sequence[int], window: Sequence[int], c_in: int, c_out: int) -> int:
    """Returns the forward FLOPs (2 per multiply-add) of one convolution over a batch."""
    return 2 * batch * math.prod(out_hw) * math.prod(window) * c_in * c_out


def max_pool(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Returns the ``size`` max-pool (an int: ``size x size``; or ``(kh, kw)``), stride = window, no padding, of
    NHWC ``x`` (B, H, W, C): (B, H // kh, W // kw, C), the trailing rows and columns that fill no window dropped,
    as ``flax.linen.max_pool(x, (kh, kw), strides=(kh, kw))``, with the same gradient: each window's cotangent
    goes to one element, its first maximum in row-major order (flax's and PyTorch's rule on ties).

    The forward is a max over a reshape, ``(B, Ho, kh, Wo, kw, C)`` reduced over the window axes; in a
    train step a running max over the window positions that also returns each window's arg-max, kept as
    the VJP's residual, and the backward is elementwise: the cotangent, broadcast over the window, where the
    window position equals the arg-max, 0 elsewhere. That replaces XLA:CPU's select-and-scatter (which it
    expands to a reduce-window over index pairs plus a scatter: ~40 % of an airbench train step's XLA op time)
    and never divides: ``jnp.max``'s own gradient, ``g * (x == max) / count(x == max)``, turned nan when XLA
    recomputed ``x`` for the comparison with a rounding different from the forward's
    (experiments/cpu_speed_airbench).
    """
    window = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return _max_pool(x, window)


def global_max_pool(x: jax.Array) -> jax.Array:
    """Returns the max of NHWC ``x`` (B, H, W, C) over its H x W pixels, (B, C), with ``max_pool``'s gradient."""
    return max_pool(x, (x.shape[1], x.shape[2])).reshape(x.shape[0], x.shape[3])


def _windows(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, H // kh, kh, W // kw, kw, C): the pooling windows, trailing rows/columns dropped."""
    (b, h, w, c), (kh, kw) = x.shape, window
    ho, wo = h // kh, w // kw
    return x[:, : ho * kh, : wo * kw, :].reshape(b, ho, kh, wo, kw, c)


def _window_positions(shape: Sequence[int]) -> jax.Array:
    """int32 array of ``shape`` (B, Ho, kh, Wo, kw, C): each element's row-major position in its window."""
    return lax.broadcasted_iota(jnp.int32, shape, 2) * shape[4] + lax.broadcasted_iota(jnp.int32, shape, 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    return jnp.max(_windows(x, window), axis=(2, 4))


def _max_pool_fwd(x: jax.Array, window: tuple[int, int]) -> tuple[jax.Array, Any]:
    # A running max over the kh * kw window positions, each an elementwise pass over (B, Ho, Wo, C)
    # (one loop fusion, vectorized along C; a variadic reduction over the window axes ran ~1.3x slower).
    # Strictly greater keeps the first maximum; a nan wins and stays, as in jnp.max.
    windows = _windows(x, window)
    pooled = windows[:, :, 0, :, 0, :]
    argmax = jnp.zeros(pooled.shape, jnp.int32)
    for i in range(window[0]):
        for j in range(window[1]):
            if i == j == 0:
                continue
            value = windows[:, :, i, :, j, :]
            take = (value > pooled) | jnp.isnan(value)
            pooled = jnp.where(take, value, pooled)
            argmax = jnp.where(take, i * window[1] + j, argmax)
    return pooled, (argmax, x.shape)


def _max_pool_bwd(window: tuple[int, int], residuals: Any, g: jax.Array) -> tuple[jax.Array]:
    argmax, (b, h, w, c) = residuals
    (_, ho, wo, _), (kh, kw) = g.shape, window
    hit = _window_positions((b, ho, kh, wo, kw, c)) == argmax[:, :, None, :, None, :]
    dx = jnp.where(hit, g[:, :, None, :, None, :], jnp.zeros((), g.dtype)).reshape(b, ho * kh, wo * kw, c)
    return (jnp.pad(dx, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0))),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
