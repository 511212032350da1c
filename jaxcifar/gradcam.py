"""Grad-CAM (Selvaraju et al., 2017) for the Linen models, defined as the ``grad-cam`` package's GradCAM.

The definition follows jacobgil/pytorch-grad-cam (``BaseCAM.forward``, ``GradCAM.get_cam_weights``,
``utils.image.scale_cam_image``), so that on the same weights and images the maps agree. Per image b:

1. eval-mode forward (BatchNorm running statistics); A_b = the activation of ``layer``, (h, w, C);
2. target t_b = ``targets[b]``, else the argmax of the raw logits; S = sum_b logits[b, t_b];
3. G = dS/dA (``jax.grad`` with respect to the model's ``perturbations`` at ``layer``);
   channel weights w_bc = mean of G_b over the spatial axes;
4. cam_b = ReLU(sum_c w_bc * A_b[..., c]);
5. cam_b -= min(cam_b); cam_b /= 1e-7 + max(cam_b); bilinear resize to the input size (H, W);
6. the same min-max once more (the package's ``aggregate_multi_layers`` rescales the layer mean).

Resizing: the package calls ``cv2.resize(cam, (W, H))``, whose default ``INTER_LINEAR`` samples at
half-pixel centers, ``src = (dst + 0.5) * h / H - 0.5``, and clamps to the border pixel.
``jax.image.resize(..., "bilinear", antialias=False)`` uses the same centers; at the border it drops
the out-of-range tap and renormalizes the triangle kernel, which gives exactly the clamped value.
JAX's default ``antialias=True`` would widen the kernel when downsampling, which cv2's INTER_LINEAR
does not, so it is off here (Grad-CAM layers are never larger than the input, so in practice only
upsampling occurs). The tests check the weights against a NumPy transcription of cv2's rule, up- and
downsampling; what remains is float32 rounding (cv2 sums in its own order).

The package's ``show_cam_on_image`` overlay also divides the blend by its maximum (brightening the
image); ``overlay`` here keeps the plain convex blend, so the image is not rescaled.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from jaxcifar.backend import lazy_jit

MIN_RESOLUTION = 5  # Below 5x5 a map cannot localize anything in a 32x32 image (layer4 of CIFAR ResNets is 4x4).
_EPS = 1e-7  # scale_cam_image's 1e-7 in ``img / (1e-7 + np.max(img))``.
_STATE_COLLECTIONS = ("perturbations", "intermediates")


def _model_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The model's own collections (``params``, ``batch_stats``), without per-call ones."""
    return {k: v for k, v in variables.items() if k not in _STATE_COLLECTIONS}


def _signature(variables: Mapping[str, Any]) -> tuple[Any, tuple[tuple[tuple[int, ...], Any], ...]]:
    """The tree structure and each leaf's (shape, dtype) of the model's own variables: all that an abstract
    forward depends on (works on arrays and tracers alike)."""
    leaves, treedef = jax.tree.flatten(_model_variables(variables))
    return treedef, tuple(
        (tuple(leaf.shape), leaf.dtype) if hasattr(leaf, "dtype") else (tuple(jnp.shape(leaf)), jnp.result_type(leaf))
        for leaf in leaves
    )


@functools.lru_cache(maxsize=64)
def _abstract_forward_cached(
    model: nn.Module, signature: tuple[Any, Any], image_shape: tuple[int, ...], interceptor: Any = None
) -> Any:
    treedef, leaves = signature
    abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

    def forward(v: dict[str, Any], images: jax.Array) -> Any:
        return model.apply(v, images, train=False, mutable=list(_STATE_COLLECTIONS))

    with nn.intercept_methods(interceptor) if interceptor is not None else contextlib.nullcontext():
        return jax.eval_shape(forward, abstract, x)


def _abstract_forward(
    model: nn.Module, variables: Mapping[str, Any], image_shape: Sequence[int], interceptor: Any = None
) -> Any:
    """(logits, state) as shapes of one eval-mode (1, H, W, C) forward with the state collections mutable,
    run under ``interceptor`` (a ``nn.intercept_methods`` function) when given.

    ``jax.eval_shape`` traces the whole model in Python (tens of milliseconds for a ResNet18, more than a
    small batch's Grad-CAM takes to run), so the result is cached per (model, variables' structure and
    shapes, image shape, interceptor); a model that cannot be hashed is traced every time. An interceptor
    must be passed here, not set around the call: the cache does not see the ones around it."""
    signature = _signature(variables)
    shape = tuple(int(d) for d in tuple(image_shape)[-3:])
    try:
        hash((model, signature, interceptor))
    except TypeError:
        return _abstract_forward_cached.__wrapped__(model, signature, shape, interceptor)
    return _abstract_forward_cached(model, signature, shape, interceptor)


def _abstract_state(
    model: nn.Module, variables: Mapping[str, Any], image_shape: Sequence[int], interceptor: Any = None
) -> dict[str, Any]:
    """Shapes of the ``perturbations`` and ``intermediates`` of one (1, H, W, C) forward (no compile; cached;
    ``interceptor`` as in ``_abstract_forward``)."""
    _, state = _abstract_forward(model, variables, image_shape, interceptor)
    return dict(state)


def layer_resolutions(
    model: nn.Module, variables: Mapping[str, Any], image_shape: Sequence[int]
) -> dict[str, tuple[int, int]]:
    """Returns ``{layer: (h, w)}`` of every sown activation for images of ``image_shape``, in forward order.

    ``image_shape`` is (H, W, C) or (B, H, W, C) (the batch size does not matter). Uses
    ``jax.eval_shape``: nothing is compiled or run.
    """
    intermediates = _abstract_state(model, variables, image_shape).get("intermediates", {})
    return {name: tuple(int(d) for d in value[0].shape[1:3]) for name, value in intermediates.items()}


def layer_resolution(
    model: nn.Module, variables: Mapping[str, Any], image_shape: Sequence[int], layer: str
) -> tuple[int, int]:
    """Returns the (h, w) of ``layer``'s activation for images of ``image_shape`` (e.g. (8, 8) for layer3 at 32x32).

    Raises ValueError naming the available layers when ``layer`` is unknown.
    """
    resolutions = layer_resolutions(model, variables, image_shape)
    if layer not in resolutions:
        raise ValueError(f"unknown layer {layer!r}; available: {', '.join(resolutions)}")
    return resolutions[layer]


def check_layer(
    model: nn.Module,
    variables: Mapping[str, Any],
    image_shape: Sequence[int],
    layer: str,
    allow_small: bool = False,
) -> tuple[int, int]:
    """Applies the 5-pixel rule; returns ``layer``'s (h, w) when it is usable.

    Raises ValueError when ``layer`` is unknown, or when its activation is smaller than 5x5 at this
    input size and ``allow_small`` is False; the message names the layers that are large enough.
    """
    resolutions = layer_resolutions(model, variables, image_shape)
    if layer not in resolutions:
        raise ValueError(f"unknown layer {layer!r}; available: {', '.join(resolutions)}")
    h, w = resolutions[layer]
    if allow_small or min(h, w) >= MIN_RESOLUTION:
        return h, w
    big = [f"{name} ({rh}x{rw})" for name, (rh, rw) in resolutions.items() if min(rh, rw) >= MIN_RESOLUTION]
    size = "x".join(str(d) for d in tuple(image_shape)[-3:-1])
    raise ValueError(
        f"{layer} is {h}x{w} for {size} inputs, smaller than {MIN_RESOLUTION}x{MIN_RESOLUTION}: too coarse for "
        f"Grad-CAM. Layers large enough: {', '.join(big) or 'none'}. Pass allow_small=True to use it anyway."
    )


def minmax_normalize(cams: jax.Array) -> jax.Array:
    """Per map ``(x - min) / (1e-7 + max(x - min))`` over the last two axes; same shape, in [0, 1).

    A constant map becomes zeros (never NaN), as in pytorch-grad-cam's ``scale_cam_image``.
    """
    cams = cams - jnp.min(cams, axis=(-2, -1), keepdims=True)
    return cams / (_EPS + jnp.max(cams, axis=(-2, -1), keepdims=True))


def scale_cam(cams: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Min-max normalizes (B, h, w) maps, resizes them bilinearly to ``size`` and normalizes again.

    Returns float32 (float64 for float64 maps) (B, *size) in [0, 1]. This is ``scale_cam_image(cam, (W, H))``
    followed by the package's ``scale_cam_image(result)`` on the (single-layer) aggregate.
    """
    cams = minmax_normalize(cams.astype(jnp.promote_types(cams.dtype, jnp.float32)))
    cams = jax.image.resize(cams, (cams.shape[0], *size), method="bilinear", antialias=False)
    return minmax_normalize(cams)


def _activation_and_gradient(
    model: nn.Module, layer: str, variables: dict[str, Any], images: jax.Array, targets: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Returns A and G = dS/dA at ``layer`` (float32 (B, h, w, C) each), S = sum of each image's target logit."""
    shapes = _abstract_state(model, variables, images.shape)["perturbations"]
    batched = jax.tree.map(lambda s: jnp.zeros((images.shape[0], *s.shape[1:]), s.dtype), shapes)

    def score(perturbations: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        logits, state = model.apply(
            {**variables, "perturbations": perturbations}, images, train=False, mutable=["intermediates"]
        )
        chosen = jnp.argmax(logits, axis=-1) if targets is None else targets
        target_logits = jnp.take_along_axis(logits, chosen[:, None], axis=-1)
        return jnp.sum(target_logits), state["intermediates"][layer][0]

    grads, activation = jax.grad(score, has_aux=True)(batched)
    return activation.astype(jnp.float32), grads[layer].astype(jnp.float32)


@functools.partial(lazy_jit, static_argnames=("model", "layer"))
def _grad_cam(
    model: nn.Module, layer: str, variables: dict[str, Any], images: jax.Array, targets: jax.Array | None
) -> jax.Array:
    """Jitted core of ``grad_cam``; one compile per (model, layer, shapes, targets given or not)."""
    activation, grads = _activation_and_gradient(model, layer, variables, images, targets)
    weights = jnp.mean(grads, axis=(1, 2))
    cams = jax.nn.relu(jnp.sum(activation * weights[:, None, None, :], axis=-1))
    return scale_cam(cams, images.shape[1:3])


def grad_cam(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    layer: str = "layer3",
    targets: jax.Array | Sequence[int] | None = None,
    *,
    allow_small: bool = False,
) -> jax.Array:
    """Grad-CAM maps of a batch, as pytorch-grad-cam's GradCAM (see the module docstring). The other
    methods and options (Grad-CAM++, ScoreCAM, softmax targets, aug_smooth, ...): ``jaxcifar.cam.cam``.

    ``images`` are normalized float (B, H, W, C) as the model expects; ``variables`` holds ``params``
    and ``batch_stats``; ``targets`` int (B,) classes to explain (default: each image's argmax).
    Returns float32 (B, H, W) in [0, 1], all zeros where the map is constant. Raises ValueError (one line)
    for images that are not a non-empty float NHWC batch with the model's channels, targets that are not
    B integers in [0, classes), an unknown layer, or one smaller than 5x5 at this input size unless
    ``allow_small`` (see ``check_layer``).
    One jitted call per batch, compiled once per (model, layer, batch shape).
    """
    images = jnp.asarray(images)
    _check_images(model, variables, images)
    check_layer(model, variables, images.shape, layer, allow_small)
    if targets is not None:
        targets = _check_targets(targets, images.shape[0], _num_classes(model, variables, images.shape))
    return _grad_cam(model, layer, _model_variables(variables), images, targets)


def _input_channels(variables: Mapping[str, Any]) -> int | None:
    """The channel count the model's first convolution takes (``params/conv1/kernel`` (3, 3, C, O)), if known."""
    kernel = variables.get("params", {}).get("conv1", {}).get("kernel") if isinstance(variables, Mapping) else None
    return int(kernel.shape[-2]) if getattr(kernel, "ndim", 0) == 4 else None


def _num_classes(model: nn.Module, variables: Mapping[str, Any], image_shape: Sequence[int]) -> int:
    """The number of logits of one forward (``jax.eval_shape``, cached: nothing runs)."""
    logits, _ = _abstract_forward(model, variables, image_shape)
    return int(logits.shape[-1])


def _check_images(model: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> None:
    """Raises ValueError unless ``images`` is a non-empty float (B, H, W, C) batch with the model's channels."""
    channels = _input_channels(variables)
    want = f"(B, H, W, {channels if channels else 'C'})"
    if images.ndim != 4:
        raise ValueError(f"images must be {want} (NHWC), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"images must hold at least one image {want}, got an empty batch {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be normalized floats {want}, got {images.dtype} (normalize uint8 images first)")
    if channels is not None and images.shape[-1] != channels:
        hint = " (NCHW? transpose to NHWC)" if images.shape[1] == channels else ""
        raise ValueError(f"images must be {want} (NHWC), got shape {images.shape}{hint}")


def _check_targets(targets: jax.Array | Sequence[int], batch: int, num_classes: int) -> jax.Array:
    """Returns ``targets`` as int32 (B,); raises ValueError for another shape, non-integers or classes out of range."""
    array = np.asarray(targets)
    if array.shape != (batch,):
        raise ValueError(f"targets must have shape ({batch},) (one class per image), got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"targets must be integer classes in [0, {num_classes}), got {array.dtype} {array.tolist()}")
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise ValueError(f"targets must be classes in [0, {num_classes}), got {bad.tolist()}")
    return jnp.asarray(array, jnp.int32)


def overlay(image01: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blends the ``cmap`` heatmap of ``cam`` over an image: ``(1 - alpha) * image + alpha * heatmap``.

    ``image01`` is float (..., H, W, 3) in [0, 1] (de-normalized, e.g. ``transforms.denormalize``),
    ``cam`` is (..., H, W) in [0, 1]; leading batch axes are allowed. Returns float32 (..., H, W, 3) in
    [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.clip(np.asarray(image01, np.float32), 0.0, 1.0)
    cam = np.clip(np.asarray(cam, np.float32), 0.0, 1.0)
    if image.shape[:-1] != cam.shape or image.shape[-1] != 3:
        raise ValueError(f"image (..., H, W, 3) and cam (..., H, W) disagree: {image.shape} vs {cam.shape}")
    heatmap = matplotlib.colormaps[cmap](cam)[..., :3].astype(np.float32)
    return (1.0 - alpha) * image + alpha * heatmap
