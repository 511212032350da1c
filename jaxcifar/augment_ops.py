"""Image operations for augmentation, batched on the device: uint8 (B, H, W, C) in, uint8 out, jit-able.

Every op takes per-image parameters (arrays of shape (B,), or scalars that apply to the whole batch) and
follows ``torchvision.transforms.v2.functional`` on uint8 tensors, rounding for rounding:

- integer ops are exact: ``invert``, ``posterize``, ``solarize``, ``autocontrast``, ``equalize``;
- blends (``adjust_brightness``, ``adjust_saturation`` = AutoAugment's Color, ``adjust_contrast``,
  ``adjust_sharpness``) compute in float32 and truncate to uint8 (torchvision's ``.to(uint8)``); the
  grayscale of saturation and contrast is floored first (0.2989 R + 0.587 G + 0.114 B), sharpness blurs
  with the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounds the blur and leaves the one-pixel
  border as it is;
- geometric ops (``affine``, ``rotate``, ``shear_x``/``shear_y``, ``translate_x``/``translate_y``) sample
  the input at the inverse-mapped centre of each output pixel (torchvision's inverse matrix,
  ``grid_sample(align_corners=False)``), nearest (round half to even) or bilinear (rounded to uint8);
  outside the image they take ``fill`` (per channel), or with ``fill=None`` zero padding, as torchvision's
  ``fill=None`` (for bilinear these differ at the border: torchvision blends a given fill with the sampled
  in-image weight). Rotations by multiples of 90 degrees are exact permutations (torchvision's ``rot90``).

``apply_op`` applies one of ``OP_NAMES`` per image with a magnitude in torchvision's auto-augment
convention (``_AutoAugmentBase._apply_image_or_video_transform``); the policies in
``jaxcifar.autoaugment`` draw those. ``random_erasing``, ``coarse_dropout`` and ``random_affine`` draw
their own per-image parameters from a key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar.names import INTERPOLATIONS

F32 = jnp.float32
# The ops of the auto-augment policies, in this order (``apply_op``'s op indices).
OP_NAMES = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
OP_INDEX = {name: i for i, name in enumerate(OP_NAMES)}
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")

Fill = float | Sequence[float] | None


def _per_image(value: jax.Array | float, batch: int, dtype: jnp.dtype = F32) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


def _to_uint8(x: jax.Array) -> jax.Array:
    """Clamps to [0, 255] and truncates (torchvision's ``clamp_(0, 255).to(torch.uint8)``)."""
    return jnp.clip(x, 0.0, 255.0).astype(jnp.uint8)


def _fill_vector(fill: Fill, channels: int) -> jax.Array | None:
    if fill is None:
        return None
    return jnp.broadcast_to(jnp.asarray(fill, F32).reshape(-1), (channels,))


# ---------------------------------------------------------------------------------------------------------
# Single-image kernels (H, W, C) uint8 -> (H, W, C) uint8; the public functions vmap them over the batch.


def _invert(image: jax.Array) -> jax.Array:
    return jnp.bitwise_not(image)


def _posterize(image: jax.Array, bits: jax.Array) -> jax.Array:
    bits = jnp.clip(bits.astype(jnp.int32), 0, 8)
    mask = jnp.left_shift(jnp.left_shift(1, bits) - 1, 8 - bits)
    return jnp.bitwise_and(image, mask.astype(jnp.uint8))


def _solarize(image: jax.Array, threshold: jax.Array) -> jax.Array:
    return jnp.where(image.astype(F32) >= threshold, jnp.bitwise_not(image), image)


def _fused_multiply_add(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """``a * b + c`` in float32 with (almost always) one rounding, as the fused multiply-add of PyTorch's
    ``add_(other, alpha=...)`` on CPU; ``a`` holds integers below 2**12 (uint8 values, blurs).

    ``b`` splits into two 12-bit halves, so both products are exact; a two-sum keeps the first addition's
    rounding error for the last one.
    """
    big = b * F32(4097.0)
    b_high = big - (big - b)
    p_high, p_low = a * b_high, a * (b - b_high)
    total = c + p_high
    error = (c - (total - p_high)) + (p_high - (total - (total - p_high)))
    return total + (error + p_low)


def _blend(image: jax.Array, other: jax.Array | float, ratio: jax.Array, alpha: jax.Array) -> jax.Array:
    """``image * ratio + other * alpha`` clamped and truncated (torchvision's ``_blend``; alpha = 1 - ratio)."""
    other = jnp.broadcast_to(jnp.asarray(other, F32), image.shape[:-1] + (jnp.shape(other)[-1:] or (1,)))
    return _to_uint8(_fused_multiply_add(other, alpha, image.astype(F32) * ratio))


def _grayscale_floor(image: jax.Array) -> jax.Array:
    x = image.astype(F32)
    return jnp.floor(x[..., 0:1] * 0.2989 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114)


def _brightness(image: jax.Array, ratio: jax.Array, alpha: jax.Array) -> jax.Array:
    del alpha  # blends with black
    return _to_uint8(image.astype(F32) * ratio)


def _saturation(image: jax.Array, ratio: jax.Array, alpha: jax.Array) -> jax.Array:
    return _blend(image, _grayscale_floor(image), ratio, alpha)


def _contrast(image: jax.Array, ratio: jax.Array, alpha: jax.Array) -> jax.Array:
    return _blend(image, jnp.mean(_grayscale_floor(image)), ratio, alpha)


_SHARPEN = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))


def _sharpness(image: jax.Array, ratio: jax.Array, alpha: jax.Array) -> jax.Array:
    del ratio  # the interior is image + alpha * (blur - image), alpha = 1 - factor
    h, w = image.shape[:2]
    x = image.astype(F32)
    blur = sum(x[dy : dy + h - 2, dx : dx + w - 2] * F32(_SHARPEN[dy][dx] / 13.0) for dy in range(3) for dx in range(3))
    inner = x[1:-1, 1:-1]
    inner = _fused_multiply_add(jnp.round(blur) - inner, alpha, inner)
    return _to_uint8(x.at[1:-1, 1:-1].set(inner))


def _autocontrast_table() -> np.ndarray:
    """uint8 (256, 256): torchvision's autocontrast of a value ``n`` above the channel's minimum in a channel
    of range ``r`` (max - min): ``n / (r * float32(1 / 255))`` in float32, clamped and truncated (``r = 0``
    maps ``n`` to itself). A table because XLA turns a division by a broadcast divisor into a multiplication
    by its reciprocal, which truncates differently for 0.4 % of the pixels."""
    n = np.arange(256, dtype=np.float32)[None, :]
    r = np.arange(256, dtype=np.float32)[:, None]
    inv_scale = np.where(r == 0, np.float32(1.0), r * np.float32(1.0 / 255.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(n / inv_scale, 0, 255).astype(np.uint8)


_AUTOCONTRAST = _autocontrast_table()


def _autocontrast(image: jax.Array) -> jax.Array:
    low, high = image.min(axis=(0, 1)), image.max(axis=(0, 1))
    flat = high == low
    offset = image.astype(jnp.int32) - jnp.where(flat, 0, low).astype(jnp.int32)
    span = jnp.where(flat, 0, high.astype(jnp.int32) - low.astype(jnp.int32))
    return jnp.asarray(_AUTOCONTRAST)[span, offset]


def _equalize_channel(channel: jax.Array) -> jax.Array:
    """PIL's histogram equalization of one uint8 channel (H, W), as torchvision's ``equalize_image``."""
    flat = channel.reshape(-1).astype(jnp.int32)
    hist = jnp.bincount(flat, length=256)
    cum = jnp.cumsum(hist)
    step = (flat.shape[0] - hist[jnp.argmax(cum)]) // 255  # pixels not of the top value, per output level
    lut = jnp.clip((cum[:-1] + step // 2) // jnp.maximum(step, 1), 0, 255)
    lut = jnp.concatenate([jnp.zeros((1,), lut.dtype), lut]).astype(jnp.uint8)
    return jnp.where(step != 0, lut[flat].reshape(channel.shape), channel)


def _equalize(image: jax.Array) -> jax.Array:
    return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)


# ---------------------------------------------------------------------------------------------------------
# Geometry: a 2x3 inverse matrix in torchvision's centred pixel coordinates (origin at the image centre,
# x right, y down), applied by ``_warp``.


def _rotation_cos_sin(degrees: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of an angle in degrees; exact 0 and +-1 at multiples of 90 degrees."""
    radians = degrees * F32(math.pi / 180.0)
    quarter = jnp.mod(degrees, 360.0) / 90.0
    exact = quarter == jnp.round(quarter)
    k = jnp.round(quarter).astype(jnp.int32) % 4
    cos = jnp.where(exact, jnp.array([1.0, 0.0, -1.0, 0.0], F32)[k], jnp.cos(radians))
    sin = jnp.where(exact, jnp.array([0.0, 1.0, 0.0, -1.0], F32)[k], jnp.sin(radians))
    return cos, sin


def inverse_affine_matrix(
    angle: jax.Array,
    translate: tuple[jax.Array, jax.Array],
    scale: jax.Array,
    shear: tuple[jax.Array, jax.Array],
    center: tuple[jax.Array, jax.Array] = (np.float32(0.0), np.float32(0.0)),  # numpy: no backend at import
) -> jax.Array:
    """torchvision's ``_get_inverse_affine_matrix`` in float32 for scalar parameters (degrees, pixels).

    ``center`` is in centred coordinates (0, 0 = the image centre). Returns the (2, 3) matrix that maps an
    output pixel's centred coordinates (x, y, 1) to the input's.
    """
    rot_cos, rot_sin = _rotation_cos_sin(angle)
    sx, sy = shear[0] * F32(math.pi / 180.0), shear[1] * F32(math.pi / 180.0)
    rms_cos, rms_sin = _rotation_cos_sin(angle - shear[1])
    cos_sy, tan_sx = jnp.cos(sy), jnp.tan(sx)
    a = rms_cos / cos_sy
    b = -(a * tan_sx + rot_sin)
    c = rms_sin / cos_sy
    d = rot_cos - c * tan_sx
    cx, cy = center
    tx, ty = cx + translate[0], cy + translate[1]
    m = jnp.stack([d, -b, -c, a]) / scale
    return jnp.stack(
        [
            jnp.stack([m[0], m[1], cx - m[0] * tx - m[1] * ty]),
            jnp.stack([m[2], m[3], cy - m[2] * tx - m[3] * ty]),
        ]
    )


def source_coordinates(theta: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """The input pixel coordinates (column, row; float32 (H, W) each) that each output pixel samples under
    the inverse matrix ``theta`` (2, 3), computed as torchvision's ``_affine_grid`` + ``grid_sample``
    (``align_corners=False``) do."""
    xs = jnp.arange(width, dtype=F32) - F32((width - 1) * 0.5)
    ys = jnp.arange(height, dtype=F32) - F32((height - 1) * 0.5)
    t = theta / jnp.array([[0.5 * width], [0.5 * height]], F32)  # normalized grid coordinates
    grid_x = xs[None, :] * t[0, 0] + ys[:, None] * t[0, 1] + t[0, 2]
    grid_y = xs[None, :] * t[1, 0] + ys[:, None] * t[1, 1] + t[1, 2]
    return (grid_x + 1.0) * F32(width / 2) - 0.5, (grid_y + 1.0) * F32(height / 2) - 0.5


def _warp(image: jax.Array, theta: jax.Array, interpolation: str, fill: jax.Array | None) -> jax.Array:
    h, w, c = image.shape
    px, py = source_coordinates(theta, h, w)
    pixels = image.reshape(h * w, c).astype(F32)

    def sample(ix: jax.Array, iy: jax.Array) -> tuple[jax.Array, jax.Array]:
        inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        index = jnp.clip(iy, 0, h - 1) * w + jnp.clip(ix, 0, w - 1)
        return jnp.where(inside[..., None], pixels[index], 0.0), inside.astype(F32)

    if interpolation == "nearest":
        values, inside = sample(jnp.round(px).astype(jnp.int32), jnp.round(py).astype(jnp.int32))
        if fill is not None:
            values = jnp.where(inside[..., None] < 0.5, fill, values)
        return _to_uint8(values)
    x0, y0 = jnp.floor(px), jnp.floor(py)
    fx, fy = px - x0, py - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    values, mask = jnp.zeros((h, w, c), F32), jnp.zeros((h, w), F32)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            v, inside = sample(x0 + dx, y0 + dy)
            values = values + v * (wx * wy)[..., None]
            mask = mask + inside * wx * wy
    if fill is not None:
        values = (values - fill) * mask[..., None] + fill
    return _to_uint8(jnp.round(values))


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; one of {', '.join(INTERPOLATIONS)}")


def warp(images: jax.Array, theta: jax.Array, interpolation: str = "nearest", fill: Fill = None) -> jax.Array:
    """Resamples each image through its inverse matrix ``theta`` (B, 2, 3) (see ``inverse_affine_matrix``).

    Returns uint8 (B, H, W, C). Raises ValueError for an ``interpolation`` not in ``INTERPOLATIONS``.
    """
    _check_interpolation(interpolation)
    fill_vector = _fill_vector(fill, images.shape[-1])
    return jax.vmap(lambda image, t: _warp(image, t, interpolation, fill_vector))(images, theta)


def affine(
    images: jax.Array,
    angle: jax.Array | float = 0.0,
    translate: tuple[jax.Array | float, jax.Array | float] = (0.0, 0.0),
    scale: jax.Array | float = 1.0,
    shear: tuple[jax.Array | float, jax.Array | float] = (0.0, 0.0),
    interpolation: str = "nearest",
    fill: Fill = None,
) -> jax.Array:
    """torchvision's ``affine`` about the image centre, per image: rotate by ``angle`` degrees (clockwise,
    as torchvision's ``affine``), scale, shear (x, y degrees), then translate (x, y pixels). Each parameter
    is a scalar or a (B,) array.

    Returns uint8 (B, H, W, C).
    """
    b = images.shape[0]
    params = (
        _per_image(angle, b),
        _per_image(translate[0], b),
        _per_image(translate[1], b),
        _per_image(scale, b),
        _per_image(shear[0], b),
        _per_image(shear[1], b),
    )
    theta = jax.vmap(lambda a, tx, ty, s, shx, shy: inverse_affine_matrix(a, (tx, ty), s, (shx, shy)))(*params)
    return warp(images, theta, interpolation, fill)


def rotate(images: jax.Array, angle: jax.Array | float, interpolation: str = "nearest", fill: Fill = None) -> jax.Array:
    """torchvision's ``rotate`` (no expand) about the centre by ``angle`` degrees, counter-clockwise.
    Returns uint8 (B, H, W, C)."""
    return warp(images, jax.vmap(_rotate_theta)(_per_image(angle, images.shape[0])), interpolation, fill)


def _rotate_theta(angle: jax.Array) -> jax.Array:
    cos, sin = _rotation_cos_sin(angle)  # torchvision's rotate is affine with -angle
    zero = jnp.zeros((), F32)
    return jnp.stack([jnp.stack([cos, -sin, zero]), jnp.stack([sin, cos, zero])])


def _shear_x_theta(magnitude: jax.Array, height: int) -> jax.Array:
    # AutoAugment's ShearX: affine(shear=[degrees(atan(m)), 0], center=[0, 0]) -> x_in = x + m * (y + H / 2)
    one, zero = jnp.ones((), F32), jnp.zeros((), F32)
    return jnp.stack([jnp.stack([one, magnitude, magnitude * F32(height / 2)]), jnp.stack([zero, one, zero])])


def _shear_y_theta(magnitude: jax.Array, width: int) -> jax.Array:
    one, zero = jnp.ones((), F32), jnp.zeros((), F32)
    return jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([magnitude, one, magnitude * F32(width / 2)])])


def _translate_theta(dx: jax.Array, dy: jax.Array) -> jax.Array:
    one, zero = jnp.ones((), F32), jnp.zeros((), F32)
    return jnp.stack([jnp.stack([one, zero, -dx]), jnp.stack([zero, one, -dy])])


def shear_x(
    images: jax.Array, magnitude: jax.Array | float, interpolation: str = "nearest", fill: Fill = None
) -> jax.Array:
    """AutoAugment's ShearX: x shear with tangent ``magnitude`` about the top-left corner (torchvision's
    ``affine(shear=[degrees(atan(m)), 0], center=[0, 0])``). Returns uint8 (B, H, W, C)."""
    theta = jax.vmap(lambda m: _shear_x_theta(m, images.shape[1]))(_per_image(magnitude, images.shape[0]))
    return warp(images, theta, interpolation, fill)


def shear_y(
    images: jax.Array, magnitude: jax.Array | float, interpolation: str = "nearest", fill: Fill = None
) -> jax.Array:
    """AutoAugment's ShearY: y shear with tangent ``magnitude`` about the top-left corner.
    Returns uint8 (B, H, W, C)."""
    theta = jax.vmap(lambda m: _shear_y_theta(m, images.shape[2]))(_per_image(magnitude, images.shape[0]))
    return warp(images, theta, interpolation, fill)


def translate_x(
    images: jax.Array, pixels: jax.Array | float, interpolation: str = "nearest", fill: Fill = None
) -> jax.Array:
    """Shifts right by ``int(pixels)`` (truncated towards zero, as AutoAugment's TranslateX).
    Returns uint8 (B, H, W, C)."""
    shift = jnp.trunc(_per_image(pixels, images.shape[0]))
    return warp(images, jax.vmap(lambda d: _translate_theta(d, jnp.zeros((), F32)))(shift), interpolation, fill)


def translate_y(
    images: jax.Array, pixels: jax.Array | float, interpolation: str = "nearest", fill: Fill = None
) -> jax.Array:
    """Shifts down by ``int(pixels)`` (truncated towards zero). Returns uint8 (B, H, W, C)."""
    shift = jnp.trunc(_per_image(pixels, images.shape[0]))
    return warp(images, jax.vmap(lambda d: _translate_theta(jnp.zeros((), F32), d))(shift), interpolation, fill)


# ---------------------------------------------------------------------------------------------------------
# Batched colour ops.


def invert(images: jax.Array) -> jax.Array:
    """``255 - x``. Returns uint8 (B, H, W, C)."""
    return _invert(images)


def posterize(images: jax.Array, bits: jax.Array | int) -> jax.Array:
    """Keeps the top ``bits`` (0..8, per image) bits of every value. Returns uint8 (B, H, W, C)."""
    return jax.vmap(_posterize)(images, _per_image(bits, images.shape[0], jnp.int32))


def solarize(images: jax.Array, threshold: jax.Array | float) -> jax.Array:
    """Inverts the values ``>= threshold`` (per image, in [0, 255]). Returns uint8 (B, H, W, C)."""
    return jax.vmap(_solarize)(images, _per_image(threshold, images.shape[0]))


def autocontrast(images: jax.Array) -> jax.Array:
    """Stretches each channel of each image to [0, 255] (a constant channel stays). Returns uint8 (B, H, W, C)."""
    return jax.vmap(_autocontrast)(images)


def equalize(images: jax.Array) -> jax.Array:
    """PIL's histogram equalization of each channel of each image. Returns uint8 (B, H, W, C)."""
    return jax.vmap(_equalize)(images)


def _factor_op(kernel: Callable[..., jax.Array], images: jax.Array, factor: jax.Array | float) -> jax.Array:
    # torchvision computes the blend's second weight 1 - factor in float64: the same for a Python number
    alpha = 1.0 - factor if isinstance(factor, int | float) else 1.0 - jnp.asarray(factor, F32)
    b = images.shape[0]
    return jax.vmap(kernel)(images, _per_image(factor, b), _per_image(alpha, b))


def adjust_brightness(images: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Multiplies by ``factor`` (per image). Returns uint8 (B, H, W, C)."""
    return _factor_op(_brightness, images, factor)


def adjust_saturation(images: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Blends with the (floored) grayscale image: 0 = gray, 1 = unchanged (AutoAugment's Color).
    Returns uint8 (B, H, W, C)."""
    return _factor_op(_saturation, images, factor)


def adjust_contrast(images: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Blends with the mean of the (floored) grayscale image. Returns uint8 (B, H, W, C)."""
    return _factor_op(_contrast, images, factor)


def adjust_sharpness(images: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Blends the interior with its 3x3 smoothing: 0 = smooth, 1 = unchanged, > 1 sharper.
    Returns uint8 (B, H, W, C)."""
    return _factor_op(_sharpness, images, factor)


# ---------------------------------------------------------------------------------------------------------
# One auto-augment op per image.

_COLOUR_KERNELS = (_brightness, _saturation, _contrast, _sharpness)


def _apply_op(
    image: jax.Array, op: jax.Array, magnitude: jax.Array, interpolation: str, fill: jax.Array | None
) -> jax.Array:
    h, w = image.shape[:2]
    thetas = jnp.stack(
        [
            _shear_x_theta(magnitude, h),
            _shear_y_theta(magnitude, w),
            _translate_theta(jnp.trunc(magnitude), jnp.zeros((), F32)),
            _translate_theta(jnp.zeros((), F32), jnp.trunc(magnitude)),
            _rotate_theta(magnitude),
        ]
    )
    geometric = (op >= OP_INDEX["ShearX"]) & (op <= OP_INDEX["Rotate"])
    theta = thetas[jnp.clip(op - OP_INDEX["ShearX"], 0, 4)]
    ratio, alpha = 1.0 + magnitude, -magnitude  # torchvision: factor 1 + m, alpha = 1.0 - factor in float64
    results = jnp.stack(
        [
            image,
            _warp(image, theta, interpolation, fill),
            *(kernel(image, ratio, alpha) for kernel in _COLOUR_KERNELS),
            _posterize(image, jnp.trunc(magnitude)),
            _solarize(image, F32(255.0) * magnitude),
            _autocontrast(image),
            _equalize(image),
            _invert(image),
        ]
    )
    slot = jnp.where(geometric, 1, jnp.maximum(op - OP_INDEX["Rotate"] + 1, 0))
    return results[slot]


def apply_op(
    images: jax.Array, op: jax.Array, magnitude: jax.Array, interpolation: str = "nearest", fill: Fill = None
) -> jax.Array:
    """Applies ``OP_NAMES[op[b]]`` with ``magnitude[b]`` to image b, as torchvision's auto-augment ops.

    ``op``: int (B,), ``magnitude``: float32 (B,) signed, in torchvision's convention: Shear tangent,
    Translate pixels (truncated), Rotate degrees, Brightness/Color/Contrast/Sharpness factor ``1 + m``,
    Posterize bits ``int(m)``, Solarize threshold ``255 m``; ignored by the other ops. All ops are computed
    and one is selected per image (no data-dependent control flow under jit). Returns uint8 (B, H, W, C).
    """
    _check_interpolation(interpolation)
    fill_vector = _fill_vector(fill, images.shape[-1])
    b = images.shape[0]
    return jax.vmap(lambda image, o, m: _apply_op(image, o, m, interpolation, fill_vector))(
        images, _per_image(op, b, jnp.int32), _per_image(magnitude, b)
    )


# ---------------------------------------------------------------------------------------------------------
# Random erasing, coarse dropout, random affine: per-image parameters from a key.


def _box_mask(top: jax.Array, left: jax.Array, height: jax.Array, width: jax.Array, h: int, w: int) -> jax.Array:
    """bool (B, h, w): True inside each image's box [top, top + height) x [left, left + width)."""
    rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def erase(
    images: jax.Array, top: jax.Array, left: jax.Array, height: jax.Array, width: jax.Array, value: Fill
) -> jax.Array:
    """Sets each image's box (per-image int arrays (B,)) to ``value`` (scalar or per channel).
    Returns uint8 (B, H, W, C) (torchvision's ``erase``)."""
    b, h, w, c = images.shape
    mask = _box_mask(*(_per_image(v, b, jnp.int32) for v in (top, left, height, width)), h, w)
    fill = _fill_vector(value if value is not None else 0.0, c).astype(images.dtype)
    return jnp.where(mask[..., None], fill, images)


def random_erasing(
    rng: jax.Array,
    images: jax.Array,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: Fill = 0.0,
    attempts: int = 10,
) -> jax.Array:
    """torchvision's ``RandomErasing`` per image: with probability ``p`` erase a box of area
    ``U(scale) * H * W`` and aspect ratio ``exp(U(log ratio))`` (height ``round(sqrt(area * r))``, width
    ``round(sqrt(area / r))``), the first of ``attempts`` draws that fits strictly inside the image, at a
    uniform position, with ``value``; an image where no draw fits stays as it is.

    Returns uint8 (B, H, W, C).
    """
    b, h, w, _ = images.shape
    apply_key, area_key, ratio_key, top_key, left_key = jax.random.split(rng, 5)
    area = (h * w) * jax.random.uniform(area_key, (b, attempts), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(ratio_key, (b, attempts), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    heights = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    widths = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (heights < h) & (widths < w)
    first = jnp.argmax(fits, axis=1)
    height = jnp.take_along_axis(heights, first[:, None], 1)[:, 0]
    width = jnp.take_along_axis(widths, first[:, None], 1)[:, 0]
    top = jax.random.randint(top_key, (b,), 0, h - height + 1)
    left = jax.random.randint(left_key, (b,), 0, w - width + 1)
    active = jax.random.bernoulli(apply_key, p, (b,)) & fits.any(axis=1)
    return erase(images, top, left, jnp.where(active, height, 0), width, value)


def coarse_dropout(
    rng: jax.Array,
    images: jax.Array,
    p: float = 0.5,
    holes: tuple[int, int] = (1, 1),
    size: tuple[int, int] = (8, 8),
    fill: Fill = 0.0,
) -> jax.Array:
    """Coarse dropout (albumentations' ``CoarseDropout``): with probability ``p`` per image, a number of
    holes uniform in ``holes`` (inclusive), each of height and width uniform in ``size`` (inclusive, drawn
    apart), placed uniformly inside the image, set to ``fill`` (scalar or per channel, e.g. the dataset
    mean in uint8 levels).

    Returns uint8 (B, H, W, C).
    """
    b, h, w, _ = images.shape
    most = holes[1]
    count_key, apply_key, hh_key, hw_key, top_key, left_key = jax.random.split(rng, 6)
    count = jax.random.randint(count_key, (b,), holes[0], holes[1] + 1)
    count = jnp.where(jax.random.bernoulli(apply_key, p, (b,)), count, 0)
    heights = jax.random.randint(hh_key, (b, most), size[0], size[1] + 1)
    widths = jax.random.randint(hw_key, (b, most), size[0], size[1] + 1)
    tops = jax.random.randint(top_key, (b, most), 0, h - heights + 1)
    lefts = jax.random.randint(left_key, (b, most), 0, w - widths + 1)
    used = jnp.arange(most)[None, :] < count[:, None]
    masks = jax.vmap(lambda t, lf, hh, ww: _box_mask(t, lf, hh, ww, h, w), in_axes=1, out_axes=1)(
        tops, lefts, jnp.where(used, heights, 0), widths
    )
    fill_vector = _fill_vector(fill, images.shape[-1]).astype(images.dtype)
    return jnp.where(masks.any(axis=1)[..., None], fill_vector, images)


def random_affine(
    rng: jax.Array,
    images: jax.Array,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
    p: float = 1.0,
    interpolation: str = "nearest",
    fill: Fill = None,
) -> jax.Array:
    """torchvision's ``RandomAffine`` per image, applied with probability ``p``: angle ``U(-degrees,
    degrees)``, translation ``round(U(-t, t) * W)`` and ``round(U(-t, t) * H)`` pixels (``translate`` = t),
    scale ``U(1 - scale, 1 + scale)``, x shear ``U(-shear, shear)`` degrees.

    Returns uint8 (B, H, W, C).
    """
    b, h, w, _ = images.shape
    keys = jax.random.split(rng, 6)
    angle = jax.random.uniform(keys[0], (b,), minval=-degrees, maxval=degrees)
    tx = jnp.round(jax.random.uniform(keys[1], (b,), minval=-translate * w, maxval=translate * w))
    ty = jnp.round(jax.random.uniform(keys[2], (b,), minval=-translate * h, maxval=translate * h))
    factor = jax.random.uniform(keys[3], (b,), minval=1.0 - scale, maxval=1.0 + scale)
    shear_x_deg = jax.random.uniform(keys[4], (b,), minval=-shear, maxval=shear)
    active = jax.random.bernoulli(keys[5], p, (b,))
    zero = jnp.zeros((b,), F32)
    out = affine(
        images,
        jnp.where(active, angle, 0.0),
        (jnp.where(active, tx, 0.0), jnp.where(active, ty, 0.0)),
        jnp.where(active, factor, 1.0),
        (jnp.where(active, shear_x_deg, 0.0), zero),
        interpolation,
        fill,
    )
    return out
