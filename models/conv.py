"""2-D convolution with faster gradients for XLA on CPU, and the CPU compiler options.

A ResNet train step on CPU is nearly all convolutions: forward, input gradient and weight gradient.
With jaxlib 0.10 on a 2-core CPU three things were measured slower than they need to be:

1. XLA hands convolutions to YNNPACK, which runs those with 64 channels on one thread.
   ``compiler_options()`` gives convolutions to XLA's Eigen kernels instead (pass it to ``jax.jit``).
2. XLA's weight gradient (a convolution over the batch) is slow for many shapes. ``conv`` can
   compute it as a matmul instead: ``dW[i, j] = sum over (b, h, w) of patch(x)[b, h, w, (i, j, c)]
   * g[b, h, w, o]``, the patches taken (im2col) a few images at a time inside a loop, so that each
   patch block stays in the CPU cache, accumulated in float32. (With several devices, whose batch
   may be sharded, it is one matmul over the whole batch.)
3. XLA's input gradient of a strided convolution convolves a zero-dilated ``g`` (2-4x slower).
   ``input_grad`` splits it into stride-1 convolutions, one per residue class (polyphase).

``conv_general_dilated`` has ``jax.lax.conv_general_dilated``'s signature, so it can be handed to
``flax.linen.Conv(conv_general_dilated=...)``: the module's parameters (name ``kernel``, HWIO
shape, initializer) do not change. Which implementation runs is chosen when the model is traced:

- ``"lax"``: ``lax.conv_general_dilated`` and its autodiff gradients (XLA's own).
- ``"matmul"``: the custom VJP (NHWC/HWIO, no dilation, no feature groups; anything else falls back
  to ``"lax"``) with the matmul weight gradient and the polyphase input gradient.
- ``"auto"`` (default): on a single CPU device, the custom VJP where it was measured faster, per
  convolution (``_custom_gradients_pay``): 1x1 kernels, and from ``AUTO_MIN_FLOPS`` on strided
  ones and those with outputs larger than 8x8; XLA's own gradients for the rest, and ``"lax"`` on
  GPU, TPU and several CPU devices.
  The environment variable ``JAXCIFAR_CONV_IMPL`` (``lax`` or ``matmul``) overrides ``"auto"``.

The custom VJP defines a VJP only: forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``)
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
XLA_CPU_CONV_ENV_VAR = "JAXCIFAR_XLA_CPU_CONV"

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
    """Returns what ``impl`` runs here, e.g. ``"lax"``, ``"matmul"`` or ``"auto: matmul weight gradient for ..."``."""
    if _explicit(impl) is not None:
        return resolve_impl(impl)
    if resolve_impl(impl) == "lax":
        return "auto: lax"
    return (
        "auto: matmul weight gradient for 1x1, strided and larger-than-8x8 3x3 convolutions, "
        "polyphase input gradient for strided ones, lax for the rest"
    )


def compiler_options() -> dict[str, str]:
    """Returns the XLA compiler options for functions that run a model here: ``{}`` off CPU.

    On CPU, XLA (jaxlib 0.10) hands convolutions to YNNPACK by default, which runs the ones with 64
    input or output channels on a single thread: measured on 2 cores, a 3x3 64->64 convolution at
    32x32, batch 128, takes 138 ms there and 64 ms (2 threads) in XLA's Eigen kernels; the stride-2
    64->128 one 71 vs 27 ms; the larger ones are within 5-10 %. These options keep YNNPACK for dots
    and reductions and give convolutions to Eigen. ``$JAXCIFAR_XLA_CPU_CONV=ynnpack`` restores XLA's
    default (for comparison).
    """
    if jax.default_backend() != "cpu":
        return {}
    choice = os.environ.get(XLA_CPU_CONV_ENV_VAR, "eigen").strip().lower() or "eigen"
    if choice not in ("eigen", "ynnpack"):
        raise ValueError(f"${XLA_CPU_CONV_ENV_VAR}={choice!r}; expected eigen or ynnpack")
    if choice == "ynnpack":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def lazy_jit(fun: Any, **jit_kwargs: Any) -> Any:
    """Returns ``fun`` jitted with ``compiler_options()`` (and ``jit_kwargs``), built on the first call.

    For module-level functions (usable as a decorator via ``functools.partial``): choosing the
    options at import time would initialize the JAX backend on ``import``, before a user could
    call ``jax.distributed.initialize()``.
    """
    jitted = None

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)
        return jitted(*args, **kwargs)

    return call


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
    dx = input_grad(kernel, g, x.shape, strides, padding)
    dw = weight_grad(x, g, kernel.shape[:2], strides, padding)
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
    convolution XLA would run on a zero-dilated ``g`` (which is 2-4x slower on CPU), none on zeros.
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


def _custom_gradients_pay(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether ``"auto"`` uses the custom VJP (matmul weight gradient, polyphase input gradient when
    strided) for this convolution on one CPU device, rather than XLA's own gradients.

    Measured per ResNet18 convolution (batch 128, width 64, 2-core AMD EPYC, XLA's Eigen convolutions,
    see ``compiler_options``), weight gradient matmul vs XLA: 1x1 stride 2 11 vs 39 ms; 3x3 stride 2
    42 vs 63 and 31 vs 40 ms (and their input gradients 57 vs 100 and 26 vs 49 ms); 3x3 stride 1 at
    16x16 67 vs 76 ms, 8x8 58 vs 57 ms, 4x4 x 512 channels 89 vs 50 ms. At 32x32 x 64 channels XLA's
    was faster alone (95 vs 122 ms), but inside the train step it transposes the activations to
    channel-major, fused with the BatchNorm backward (115-213 ms per convolution in a profile), so the
    whole step was faster with the matmul there (2.93-2.96 vs 3.13 s). Below ``AUTO_MIN_FLOPS``
    (test-size models) XLA's is as fast and compiles quicker.
    """
    batch, height, width, c_in = x_shape
    kh, kw, _, c_out = kernel_shape
    if kh * kw == 1:
        return True
    out_pixels = math.ceil(height / strides[0]) * math.ceil(width / strides[1])
    if flops(batch, (out_pixels,), (kh, kw), c_in, c_out) < AUTO_MIN_FLOPS:
        return False
    return any(s > 1 for s in strides) or out_pixels > 8 * 8


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
        if _explicit(impl) is None and not _custom_gradients_pay(lhs.shape, rhs.shape, window_strides):
            return plain()
        return conv(lhs, rhs, window_strides, padding)

    return conv_general_dilated


def flops(batch: int, out_hw: Sequence[int], window: Sequence[int], c_in: int, c_out: int) -> int:
    """Returns the forward FLOPs (2 per multiply-add) of one convolution over a batch."""
    return 2 * batch * math.prod(out_hw) * math.prod(window) * c_in * c_out
