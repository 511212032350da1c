"""2-D convolution with a matmul weight gradient, for XLA on CPU.

XLA's CPU backend computes a convolution's forward pass and input gradient close to the machine's
peak, but its weight gradient (a convolution over the batch, with the activations transposed to
channel-major first) runs at a fraction of it and dominates a ResNet train step. ``conv`` keeps
XLA's forward convolution and input gradient and computes the weight gradient as a matmul instead:
``dW[i, j] = sum over (b, h, w) of patch(x)[b, h, w, (i, j, c)] * g[b, h, w, o]``, the patches
taken (im2col) a few images at a time inside a loop, so that each patch block stays in the CPU
cache, and accumulated in float32. (With several devices, whose batch may be sharded, it is one
matmul over the whole batch instead.)

``conv_general_dilated`` has ``jax.lax.conv_general_dilated``'s signature, so it can be handed to
``flax.linen.Conv(conv_general_dilated=...)``: the module's parameters (name ``kernel``, HWIO
shape, initializer) do not change. Which implementation runs is chosen when the model is traced:

- ``"lax"``: ``lax.conv_general_dilated`` and its autodiff gradients (XLA's own).
- ``"matmul"``: the custom VJP above (NHWC/HWIO, no dilation, no feature groups; anything else
  falls back to ``"lax"``).
- ``"auto"`` (default): on a single CPU device, ``"matmul"`` for the convolutions where it was
  measured faster (1x1 kernels; larger kernels from ``AUTO_MIN_FLOPS`` per call) and ``"lax"`` for
  the small ones; ``"lax"`` on GPU, TPU and several CPU devices.
  The environment variable ``JAXCIFAR_CONV_IMPL`` (``lax`` or ``matmul``) overrides ``"auto"``.

The matmul path defines a VJP only: forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``)
of a model using it raises an error; build the model with ``conv_impl="lax"`` for that.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "lax", "matmul")
ENV_VAR = "JAXCIFAR_CONV_IMPL"

# Patch block size of the weight gradient: images per loop iteration are chosen so that one block
# of patches, (images x Ho x Wo) rows of (kh x kw x C_in) values, holds about this many bytes.
# 3-8 MiB measured best on a 2-core AMD EPYC (ResNet18 shapes, batch 128); 1 image minimum.
PATCH_BLOCK_BYTES = 4 * 2**20

# "auto" keeps XLA's weight gradient for convolutions (other than 1x1) below this many forward FLOPs
# per call, batch included. Whole ResNet18 train steps on CPU: XLA's was faster below it (batch 32 at
# widths 8 and 16: 0.04 and 0.15 GFLOP per 3x3 conv), about equal at 0.3 (batch 64, width 16), and the
# matmul faster above (batch 256 width 8: 9%; batch 128 width 16-64 and batch 512 width 16: 12-40%).
# The matmul path also compiles ~2 s slower per model, which matters for small test models.
AUTO_MIN_FLOPS = 2.5e8

Padding = Sequence[tuple[int, int]]
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _explicit(impl: str) -> str | None:
    """Returns ``impl``, or for ``"auto"`` the value of ``$JAXCIFAR_CONV_IMPL`` (None when unset)."""
    if impl != "auto":
        if impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv implementation {impl!r}; expected one of: {', '.join(CONV_IMPLS)}")
        return impl
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env not in CONV_IMPLS:
        raise ValueError(f"${ENV_VAR}={env!r}; expected one of: {', '.join(CONV_IMPLS)}")
    return None if env in ("", "auto") else env


def resolve_impl(impl: str = "auto") -> str:
    """Returns the implementation ``impl`` stands for: ``"lax"`` or ``"matmul"``.

    ``"auto"`` reads ``$JAXCIFAR_CONV_IMPL`` and else picks ``"matmul"`` on a single CPU device and
    ``"lax"`` elsewhere (GPU, TPU, several devices); there, ``"matmul"`` still applies only to the
    convolutions where it pays (``AUTO_MIN_FLOPS``). Raises ValueError for an unknown name.
    """
    explicit = _explicit(impl)
    if explicit is not None:
        return explicit
    return "matmul" if jax.default_backend() == "cpu" and jax.device_count() == 1 else "lax"


def describe_impl(impl: str = "auto") -> str:
    """Returns what ``impl`` runs here, e.g. ``"lax"``, ``"matmul"`` or ``"auto: matmul for 1x1 and large ..."``."""
    if _explicit(impl) is not None:
        return resolve_impl(impl)
    if resolve_impl(impl) == "lax":
        return "auto: lax"
    return "auto: matmul weight gradient for 1x1 and large 3x3 convolutions, lax for small ones"


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding) -> jax.Array:
    """NHWC x HWIO convolution with explicit padding and the matmul weight gradient.

    ``x`` (B, H, W, C_in), ``kernel`` (kh, kw, C_in, C_out), ``padding`` ((top, bottom), (left, right)).
    Returns (B, Ho, Wo, C_out) in the inputs' dtype, equal to ``lax.conv_general_dilated``'s.
    """
    return _conv(x, kernel, tuple(int(s) for s in strides), tuple((int(lo), int(hi)) for lo, hi in padding))


def _lax_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], padding: tuple) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], padding: tuple) -> jax.Array:
    return _lax_conv(x, kernel, strides, padding)


def _conv_fwd(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], padding: tuple) -> tuple[jax.Array, Any]:
    return _lax_conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides: tuple[int, ...], padding: tuple, residuals: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, kernel, strides, padding), x)
    (dx,) = input_vjp(g)
    dw = weight_grad(x, g, kernel.shape[:2], strides, padding)
    return dx, dw.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _images_per_block(batch: int, rows_per_image: int, cols: int, itemsize: int) -> int:
    """Returns the largest divisor of ``batch`` whose patch block fits ``PATCH_BLOCK_BYTES`` (at least 1)."""
    target = max(1, PATCH_BLOCK_BYTES // max(1, rows_per_image * cols * itemsize))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= target) if target < batch else batch


def _patches(x: jax.Array, window: Sequence[int], strides: Sequence[int], out_hw: Sequence[int]) -> jax.Array:
    """Returns the im2col patches of a padded NHWC ``x``: (B, Ho, Wo, kh * kw * C), ordered (i, j, c)."""
    (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
    taps = [
        x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] for i in range(kh) for j in range(kw)
    ]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def weight_grad(
    x: jax.Array, g: jax.Array, window: Sequence[int], strides: Sequence[int], padding: Padding
) -> jax.Array:
    """Returns dL/dkernel of ``conv(x, kernel, strides, padding)`` given ``g`` = dL/doutput.

    ``x`` (B, H, W, C_in), ``g`` (B, Ho, Wo, C_out); the result is float32 (kh, kw, C_in, C_out),
    a sum of patch-block matmuls accumulated in float32.
    """
    (kh, kw), (sh, sw) = window, strides
    batch, ho, wo, c_out = g.shape
    c_in = x.shape[-1]
    cols = kh * kw * c_in
    per_block = _images_per_block(batch, ho * wo, cols, x.dtype.itemsize)
    if jax.device_count() > 1:
        # The batch may be sharded over devices: a loop over batch blocks would put collectives
        # inside a while loop (seen to deadlock XLA:CPU with 8 host devices). One dot instead.
        per_block = batch
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


def _matmul_pays(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether ``"auto"`` uses the matmul weight gradient for this convolution (measured on CPU).

    XLA's own weight gradient is as fast for small convolutions and much slower for large ones
    (2-5x at 9.7 GFLOP, batch 128-512); for strided 1x1 kernels the matmul always won (2-10x).
    """
    batch, height, width, c_in = x_shape
    kh, kw, _, c_out = kernel_shape
    if kh * kw == 1:
        return True
    out_pixels = math.ceil(height / strides[0]) * math.ceil(width / strides[1])
    flops = 2 * batch * out_pixels * kh * kw * c_in * c_out
    return flops >= AUTO_MIN_FLOPS


def make_conv_general_dilated(impl: str = "auto") -> Any:
    """Returns a drop-in ``lax.conv_general_dilated`` replacement that runs implementation ``impl``.

    ``impl`` is resolved (``resolve_impl``) each time the returned function is traced, so ``"auto"``
    follows the backend the model is traced on. Unsupported configurations use the lax conv.
    """

    def conv_general_dilated(
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
        """``lax.conv_general_dilated`` with the matmul weight gradient where supported. Returns the output."""
        plain = functools.partial(
            lax.conv_general_dilated,
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
        if resolve_impl(impl) == "lax" or precision is not None or preferred_element_type is not None:
            return plain()
        if not _supported(
            lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count
        ):
            return plain()
        if _explicit(impl) is None and not _matmul_pays(lhs.shape, rhs.shape, window_strides):
            return plain()
        return conv(lhs, rhs, window_strides, padding)

    return conv_general_dilated


def flops(batch: int, out_hw: Sequence[int], window: Sequence[int], c_in: int, c_out: int) -> int:
    """Returns the forward FLOPs (2 per multiply-add) of one convolution over a batch."""
    return 2 * batch * math.prod(out_hw) * math.prod(window) * c_in * c_out
