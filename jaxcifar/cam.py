"""The CAM family of pytorch-grad-cam 1.5.7, batched and jitted: ``cam(model, variables, images, method=...)``.

Every method turns the activation A (B, h, w, C) of ``layer`` and the gradient G = dS/dA of the target
score S = sum_b score_b (``target="logit"``: the logit of image b's target class; ``"softmax"``: its
probability) into *weighted activations* (B, h, w, C); the map is their sum over channels (or, with
``eigen_smooth`` and for the Eigen methods, their first principal component), then ReLU, min-max, a
bilinear resize to the input size and min-max again (``gradcam.scale_cam``). The weightings, as
pytorch-grad-cam defines them (sums and means over the spatial axes h, w):

==================  ===========================================================================
gradcam             A * mean(G)
hirescam            A * G
gradcamelementwise  ReLU(A * G)
gradcam++           A * sum(ReLU(G) * a), a = G^2 / (2 G^2 + sum(A) G^3 + 1e-6) where G != 0, else 0
xgradcam            A * sum(G * A / (sum(A) + 1e-7))
layercam            ReLU(G) * A
eigencam            A, always projected on its first principal component
eigengradcam        A * G, always projected on its first principal component
scorecam            A * softmax_c(score of the image times channel c's mask), the mask being A's channel
                    upsampled bilinearly (align_corners=True) to (H, W) and min-max scaled (1e-8)
ablationcam         A * (score - score with channel c ablated) / score; ablation sets channel c to 0 when
                    the image's activation has minimum 0 (as after a ReLU), else to that minimum - 1e7
==================  ===========================================================================

The principal component (``eigen_projection``) is the projection of the channel vectors, centered
over the h*w positions, on their first right singular vector (found with ``eigh`` of the smaller Gram
matrix, which is much faster than an SVD on CPU). Its sign is arbitrary (pytorch-grad-cam
keeps whatever ``np.linalg.svd`` returns); here it is fixed: the projection is made to correlate
positively with the channel sum of the same weighted activations (the map without projection), so
that ``eigencam`` points where the activations are large. A projection uncorrelated with the sum
keeps the solver's sign.

ScoreCAM and AblationCAM need one forward per (image, channel): both run as ``jax.lax.map`` over
chunks of ``batch_size`` masked forwards, inside the same jitted call. AblationCAM replaces the
activation through the model's ``perturbations`` collection (A + (A' - A)), under ``jax.vmap`` over the
channels: the layers before ``layer`` do not depend on the mapped axis, so they run once per chunk.

``aug_smooth`` averages the maps of 6 views (horizontal flip x brightness 0.9, 1.0, 1.1 on the
normalized images, as pytorch-grad-cam's default ttach transforms), each flipped back, without a final
rescale. Without ``targets`` every view explains its own predicted class, as pytorch-grad-cam does.

FullGrad uses no layer (see ``_fullgrad_maps``); its ``eigen_smooth`` is pytorch-grad-cam's too: the
principal component of its per-layer maps at 1/8 of the image size, with the sign convention above.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcifar import gradcam
from jaxcifar.backend import lazy_jit

TARGETS = ("logit", "softmax")
GRADPP_EPS = 1e-6  # grad_cam_plusplus.py: ``eps = 0.000001``
XGRAD_EPS = 1e-7  # xgrad_cam.py: ``eps = 1e-7``
SCORE_EPS = 1e-8  # score_cam.py: ``(upsampled - mins) / (maxs - mins + 1e-8)``
ABLATION_VALUE = 1e7  # ablation_layer.py: channels of an activation whose minimum is not 0 become min - 1e7
AUG_FACTORS = (0.9, 1.0, 1.1)  # ttach.Multiply factors of pytorch-grad-cam's aug_smooth, times no flip / flip
DEFAULT_BATCH_SIZE = 64  # masked forwards per step of ScoreCAM and AblationCAM

Weighting = Callable[[jax.Array, jax.Array], jax.Array]


def _spatial_sum(x: jax.Array) -> jax.Array:
    """(B, h, w, C) -> (B, 1, 1, C) sums over the spatial axes."""
    return jnp.sum(x, axis=(1, 2), keepdims=True)


def weigh_gradcam(a: jax.Array, g: jax.Array) -> jax.Array:
    """Grad-CAM: each channel weighted by its mean gradient. (B, h, w, C) -> (B, h, w, C)."""
    return a * jnp.mean(g, axis=(1, 2), keepdims=True)


def weigh_hirescam(a: jax.Array, g: jax.Array) -> jax.Array:
    """HiResCAM: activation times gradient, element by element. (B, h, w, C) -> (B, h, w, C)."""
    return a * g


def weigh_gradcam_elementwise(a: jax.Array, g: jax.Array) -> jax.Array:
    """GradCAMElementWise: ReLU of activation times gradient. (B, h, w, C) -> (B, h, w, C)."""
    return jax.nn.relu(a * g)


def weigh_gradcam_plusplus(a: jax.Array, g: jax.Array) -> jax.Array:
    """Grad-CAM++ (eq. 19 of arXiv:1710.11063 as pytorch-grad-cam writes it). (B, h, w, C) -> (B, h, w, C)."""
    g2 = g * g
    alpha = g2 / (2 * g2 + _spatial_sum(a) * g2 * g + GRADPP_EPS)
    alpha = jnp.where(g != 0, alpha, 0.0)
    return a * _spatial_sum(jax.nn.relu(g) * alpha)


def weigh_xgradcam(a: jax.Array, g: jax.Array) -> jax.Array:
    """XGrad-CAM: channel weight sum(G * A) / (sum(A) + 1e-7). (B, h, w, C) -> (B, h, w, C)."""
    return a * _spatial_sum(g * a / (_spatial_sum(a) + XGRAD_EPS))


def weigh_layercam(a: jax.Array, g: jax.Array) -> jax.Array:
    """LayerCAM: activation times the positive part of the gradient. (B, h, w, C) -> (B, h, w, C)."""
    return jax.nn.relu(g) * a


def weigh_eigencam(a: jax.Array, g: jax.Array) -> jax.Array:
    """EigenCAM: the activation itself (projected later). (B, h, w, C) -> (B, h, w, C)."""
    del g
    return a


# name -> (weighting of (A, G), needs G, always projected on the first principal component).
# scorecam and ablationcam weigh with forward passes instead (``_perturbation_weights``).
GRADIENT_METHODS: dict[str, tuple[Weighting, bool, bool]] = {
    "gradcam": (weigh_gradcam, True, False),
    "hirescam": (weigh_hirescam, True, False),
    "gradcamelementwise": (weigh_gradcam_elementwise, True, False),
    "gradcam++": (weigh_gradcam_plusplus, True, False),
    "xgradcam": (weigh_xgradcam, True, False),
    "layercam": (weigh_layercam, True, False),
    "eigencam": (weigh_eigencam, False, True),
    "eigengradcam": (weigh_hirescam, True, True),
}
PERTURBATION_METHODS = ("scorecam", "ablationcam")
METHODS = (*GRADIENT_METHODS, *PERTURBATION_METHODS, "fullgrad")


def eigen_projection(weighted: jax.Array) -> jax.Array:
    """First principal component of each image's channel vectors: (B, h, w, C) -> (B, h, w).

    The (h*w, C) matrix is centered over positions (NaNs read as 0), projected on its first right
    singular vector, and signed to correlate positively with the channel sum (see the module docstring).
    """
    weighted = jnp.where(jnp.isnan(weighted), 0.0, weighted)
    b, h, w, c = weighted.shape
    flat = weighted.reshape(b, h * w, c)
    centered = flat - jnp.mean(flat, axis=1, keepdims=True)
    # The first right singular vector v of X (h*w, C) without an SVD (slow on CPU): from the smaller Gram
    # matrix, X^T X = V S^2 V^T (then X v), or X X^T = U S^2 U^T (then X v = s_1 u_1).
    if h * w < c:
        values, vectors = jnp.linalg.eigh(jnp.einsum("bpc,bqc->bpq", centered, centered))
        projection = vectors[:, :, -1] * jnp.sqrt(jnp.maximum(values[:, -1:], 0.0))
    else:
        _, vectors = jnp.linalg.eigh(jnp.einsum("bpc,bpd->bcd", centered, centered))
        projection = jnp.einsum("bpc,bc->bp", centered, vectors[:, :, -1])
    agreement = jnp.sum(projection * jnp.sum(flat, axis=-1), axis=1, keepdims=True)
    projection = jnp.where(agreement < 0, -projection, projection)
    return projection.reshape(b, h, w)


def target_scores(logits: jax.Array, targets: jax.Array, target: str) -> jax.Array:
    """(B, classes) logits, int (B,) classes -> (B,) scores: the logit or the softmax probability."""
    values = jax.nn.softmax(logits, axis=-1) if target == "softmax" else logits
    return jnp.take_along_axis(values, targets[:, None], axis=-1)[:, 0]


def _forward(
    model: nn.Module, layer: str, variables: dict[str, Any], images: jax.Array, perturbations: Any = None
) -> tuple[jax.Array, jax.Array]:
    """Eval-mode (logits (B, classes), activation of ``layer`` (B, h, w, C))."""
    extra = {} if perturbations is None else {"perturbations": perturbations}
    logits, state = model.apply({**variables, **extra}, images, train=False, mutable=["intermediates"])
    return logits, state["intermediates"][layer][0]


def _zero_perturbations(model: nn.Module, variables: dict[str, Any], images: jax.Array, interceptor: Any = None) -> Any:
    """Zeros of the model's ``perturbations`` collection for this batch (of the model run under
    ``interceptor``, a ``nn.intercept_methods`` function, when given)."""
    shapes = gradcam._abstract_state(model, variables, images.shape, interceptor)["perturbations"]
    return jax.tree.map(lambda s: jnp.zeros((images.shape[0], *s.shape[1:]), s.dtype), shapes)


def activations_and_gradients(
    model: nn.Module,
    layer: str,
    variables: dict[str, Any],
    images: jax.Array,
    targets: jax.Array | None,
    target: str = "logit",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Returns (A, G, logits, targets): A and G = dS/dA (B, h, w, C) at ``layer``, logits (B, classes),
    the int32 (B,) targets used (``targets``, else each image's argmax); S = sum of ``target_scores``."""
    zeros = _zero_perturbations(model, variables, images)

    def score(perturbations: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        logits, activation = _forward(model, layer, variables, images, perturbations)
        chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32) if targets is None else targets
        return jnp.sum(target_scores(logits, chosen, target)), (activation, logits, chosen)

    grads, (activation, logits, chosen) = jax.grad(score, has_aux=True)(zeros)
    return activation, grads[layer], logits, chosen


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of bilinear resizing with align_corners=True (``nn.UpsamplingBilinear2d``)."""
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    low = np.clip(np.floor(src).astype(int), 0, n_in - 1)
    high = np.clip(low + 1, 0, n_in - 1)
    frac = src - low
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    return matrix


def score_cam_masks(activation: jax.Array, size: tuple[int, int]) -> jax.Array:
    """ScoreCAM's masks: (B, h, w, C) -> (B, C, H, W), each channel upsampled (align_corners=True) and
    min-max scaled to [0, 1] with 1e-8."""
    rows = jnp.asarray(align_corners_matrix(activation.shape[1], size[0]), activation.dtype)
    cols = jnp.asarray(align_corners_matrix(activation.shape[2], size[1]), activation.dtype)
    up = jnp.einsum("Hh,bhwc,Ww->bcHW", rows, activation, cols)
    low = jnp.min(up, axis=(2, 3), keepdims=True)
    high = jnp.max(up, axis=(2, 3), keepdims=True)
    return (up - low) / (high - low + SCORE_EPS)


def _score_cam_weights(
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    activation: jax.Array,
    targets: jax.Array,
    target: str,
    batch_size: int,
) -> jax.Array:
    """(B, C) softmax over channels of the target score of each image times each channel's mask."""
    masks = score_cam_masks(activation, images.shape[1:3])  # (B, C, H, W)
    b, c = masks.shape[:2]
    image_index = jnp.repeat(jnp.arange(b), c)

    def one(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        i, mask = args
        logits = model.apply(variables, (images[i] * mask[..., None])[None], train=False)
        return target_scores(logits, targets[i][None], target)[0]

    scores = lax.map(one, (image_index, masks.reshape(b * c, *masks.shape[2:])), batch_size=batch_size)
    return jax.nn.softmax(scores.reshape(b, c), axis=-1)


def ablated_values(activation: jax.Array) -> jax.Array:
    """(B,) the value an ablated channel takes: 0 where the image's activation has minimum 0, else min - 1e7."""
    low = jnp.min(activation, axis=(1, 2, 3))
    return jnp.where(low == 0, 0.0, low - ABLATION_VALUE).astype(activation.dtype)


def _ablation_cam_weights(
    model: nn.Module,
    layer: str,
    variables: dict[str, Any],
    images: jax.Array,
    activation: jax.Array,
    logits: jax.Array,
    targets: jax.Array,
    target: str,
    batch_size: int,
) -> jax.Array:
    """(B, C) relative drop of the target score when channel c of ``layer`` is ablated."""
    zeros = _zero_perturbations(model, variables, images)
    value = ablated_values(activation)[:, None, None]
    original = target_scores(logits, targets, target)
    channels = activation.shape[-1]
    per_step = max(1, batch_size // images.shape[0])

    def one(channel: jax.Array) -> jax.Array:
        delta = jnp.zeros_like(activation).at[..., channel].set(value - activation[..., channel])
        ablated_logits, _ = _forward(model, layer, variables, images, {**zeros, layer: delta})
        return target_scores(ablated_logits, targets, target)

    scores = lax.map(one, jnp.arange(channels), batch_size=per_step).T  # (B, C)
    return (original[:, None] - scores) / original[:, None]


def _fullgrad_interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
    """Marks the output of every BatchNorm (and biased Conv) for FullGrad: a ``fullgrad`` perturbation (for
    its gradient) and its effective bias sown as ``fullgrad_bias`` (BatchNorm in eval mode:
    bias - running mean * scale / sqrt(running var + eps))."""
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__":
        return out
    if isinstance(module, nn.BatchNorm):
        mean = module.get_variable("batch_stats", "mean")
        var = module.get_variable("batch_stats", "var")
        scale = module.get_variable("params", "scale") if module.use_scale else 1.0
        shift = module.get_variable("params", "bias") if module.use_bias else 0.0
        bias = shift - mean * scale / jnp.sqrt(var + module.epsilon)
    elif isinstance(module, nn.Conv) and module.use_bias:
        bias = module.get_variable("params", "bias")
    else:
        return out
    module.sow("intermediates", "fullgrad_bias", bias)
    return module.perturb("fullgrad", out)


def _per_channel_minmax(x: jax.Array) -> jax.Array:
    """(B, h, w, C): each (image, channel) map min-max scaled over (h, w), as ``scale_cam_image``."""
    return jnp.moveaxis(gradcam.minmax_normalize(jnp.moveaxis(x, -1, 1)), 1, -1)


def _fullgrad_maps(
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    targets: jax.Array | None,
    target: str,
    eigen_smooth: bool = False,
) -> jax.Array:
    """FullGrad (arXiv:1905.00780) as pytorch-grad-cam computes it: (B, H, W) in [0, 1]. With
    ``eigen_smooth``, as there: the input's 3 maps and each layer's map (min-max scaled) are resized to
    1/8 of the image, replaced by their first principal component (``eigen_projection``), and that is
    scaled back up (no ReLU)."""
    zeros = _zero_perturbations(model, variables, images, _fullgrad_interceptor)
    with nn.intercept_methods(_fullgrad_interceptor):

        def score(perturbations: Any, x: jax.Array) -> tuple[jax.Array, Any]:
            logits, state = model.apply(
                {**variables, "perturbations": perturbations}, x, train=False, mutable=["intermediates"]
            )
            chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32) if targets is None else targets
            return jnp.sum(target_scores(logits, chosen, target)), state["intermediates"]

        (grads, input_grad), intermediates = jax.grad(score, argnums=(0, 1), has_aux=True)(zeros, images)
    size = images.shape[1:3]
    input_maps = _per_channel_minmax(jnp.abs(input_grad * images))  # (B, H, W, C)
    biases = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
    flat_grads = flax.traverse_util.flatten_dict(flax.core.unfreeze(grads))
    layer_maps = []
    for path, (bias,) in biases.items():
        if path[-1] != "fullgrad_bias":
            continue
        grad = flat_grads[(*path[:-1], "fullgrad")]
        summed = jnp.sum(_per_channel_minmax(jnp.abs(bias * grad)), axis=-1)  # resizing is linear: sum first
        layer_maps.append(jax.image.resize(summed, (summed.shape[0], *size), method="bilinear", antialias=False))
    if not eigen_smooth:
        return gradcam.minmax_normalize(jnp.sum(input_maps, axis=-1) + sum(layer_maps))
    stacked = _per_channel_minmax(jnp.concatenate([input_maps, *(m[..., None] for m in layer_maps)], axis=-1))
    small = (len(images), size[0] // 8, size[1] // 8, stacked.shape[-1])
    projection = eigen_projection(jax.image.resize(stacked, small, method="bilinear", antialias=False))
    return gradcam.scale_cam(projection, size)


def _maps(
    model: nn.Module,
    layer: str,
    method: str,
    target: str,
    eigen_smooth: bool,
    batch_size: int,
    variables: dict[str, Any],
    images: jax.Array,
    targets: jax.Array | None,
) -> jax.Array:
    """(B, H, W) maps in [0, 1] of one batch (no augmentation)."""
    size = images.shape[1:3]
    if method == "fullgrad":
        return _fullgrad_maps(model, variables, images, targets, target, eigen_smooth)
    if method in GRADIENT_METHODS:
        activation, grads, _, _ = activations_and_gradients(model, layer, variables, images, targets, target)
        return gradient_maps(method, activation, grads, size, eigen_smooth)
    logits, activation = _forward(model, layer, variables, images)
    chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32) if targets is None else targets
    if method == "scorecam":
        weights = _score_cam_weights(model, variables, images, activation, chosen, target, batch_size)
    else:
        weights = _ablation_cam_weights(model, layer, variables, images, activation, logits, chosen, target, batch_size)
    return weighted_maps(activation * weights[:, None, None, :], size, eigen_smooth)


def weighted_maps(weighted: jax.Array, size: tuple[int, int], project: bool = False) -> jax.Array:
    """(B, h, w, C) weighted activations -> (B, *size) maps in [0, 1]: channel sum (or ``eigen_projection``
    when ``project``), ReLU, ``gradcam.scale_cam``."""
    maps = eigen_projection(weighted) if project else jnp.sum(weighted, axis=-1)
    return gradcam.scale_cam(jax.nn.relu(maps), size)


def gradient_maps(
    method: str, activation: jax.Array, grads: jax.Array, size: tuple[int, int], eigen_smooth: bool = False
) -> jax.Array:
    """Maps (B, *size) in [0, 1] of a ``GRADIENT_METHODS`` method from A and G (B, h, w, C) at one layer."""
    weigh, _, always_project = GRADIENT_METHODS[method]
    return weighted_maps(weigh(activation, grads), size, always_project or eigen_smooth)


def augmented_views(images: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (6, B, H, W, C): no flip then flip, each times 0.9, 1.0, 1.1 (ttach's order)."""
    flips = jnp.stack([images, images[:, :, ::-1, :]])
    factors = jnp.asarray(AUG_FACTORS, images.dtype)[:, None, None, None, None]
    return (flips[:, None] * factors).reshape(len(AUG_FACTORS) * 2, *images.shape)


def _cam_impl(
    model: nn.Module,
    layer: str,
    method: str,
    target: str,
    eigen_smooth: bool,
    aug_smooth: bool,
    batch_size: int,
    variables: dict[str, Any],
    images: jax.Array,
    targets: jax.Array | None,
) -> jax.Array:
    """The core of ``cam``: (B, H, W) maps of validated arguments (jitted as ``_cam``)."""
    maps = functools.partial(_maps, model, layer, method, target, eigen_smooth, batch_size, variables)
    if not aug_smooth:
        return maps(images, targets)
    views = augmented_views(images)
    n, b = views.shape[:2]
    tiled = None if targets is None else jnp.tile(targets, n)
    out = maps(views.reshape(n * b, *images.shape[1:]), tiled).reshape(n, b, *images.shape[1:3])
    half = len(AUG_FACTORS)
    out = jnp.concatenate([out[:half], out[half:, :, :, ::-1]])  # flip the flipped views back
    return jnp.mean(out, axis=0)


# One compile per (model, layer, method, options, shapes, targets given or not). Under an outer jit
# ``cam`` calls ``_cam_impl`` directly: compiler options are only allowed on the outermost jit.
_cam = lazy_jit(
    _cam_impl, static_argnames=("model", "layer", "method", "target", "eigen_smooth", "aug_smooth", "batch_size")
)


def _traced(*trees: Any) -> bool:
    """Whether any leaf is a tracer (``cam`` is being traced by an outer transformation)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def cam(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    layer: str = "layer3",
    method: str = "gradcam",
    targets: jax.Array | Sequence[int] | None = None,
    *,
    target: str = "logit",
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    allow_small: bool = False,
) -> jax.Array:
    """Class activation maps of a batch with ``method`` (one of ``METHODS``), as pytorch-grad-cam 1.5.7's.

    ``images`` are normalized float (B, H, W, C) as the model expects; ``variables`` holds ``params``
    and ``batch_stats``; ``targets`` int (B,) classes to explain (default: each image's argmax);
    ``target`` ``"logit"`` or ``"softmax"`` (what is differentiated or scored); ``aug_smooth`` and
    ``eigen_smooth`` as in pytorch-grad-cam (module docstring); ``batch_size`` masked forwards per step
    of ScoreCAM and AblationCAM. Returns float32 (float64 for a float64 model) (B, H, W) maps in [0, 1].
    Usable under ``jax.jit`` (``targets`` may then be traced; their range is not checked).
    One jitted call per batch, compiled once per (model, layer, method, options, shapes, targets given
    or not); the checks below are cached too, so a repeated call runs no model code in Python.
    Raises ValueError (one line) for an unknown method or target, bad images or targets, an unknown
    layer, or one smaller than 5x5 unless ``allow_small`` (see ``gradcam.check_layer``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; available: {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    images = jnp.asarray(images)
    gradcam._check_images(model, variables, images)
    gradcam.check_layer(model, variables, images.shape, layer, allow_small)
    if targets is not None:
        targets = _checked_targets(model, variables, images, targets)
    core = _cam_impl if _traced(variables, images, targets) else _cam
    return core(
        model,
        layer,
        method,
        target,
        bool(eigen_smooth),
        bool(aug_smooth),
        batch_size,
        gradcam._model_variables(variables),
        images,
        targets,
    )


def _checked_targets(
    model: nn.Module, variables: Mapping[str, Any], images: jax.Array, targets: jax.Array | Sequence[int]
) -> jax.Array:
    """``targets`` as int32 (B,); traced targets (under jit) are checked for shape and dtype only."""
    if isinstance(targets, jax.core.Tracer):
        if targets.shape != (images.shape[0],) or not jnp.issubdtype(targets.dtype, jnp.integer):
            raise ValueError(f"targets must be {images.shape[0]} integer classes, got {targets.dtype}{targets.shape}")
        return targets.astype(jnp.int32)
    classes = gradcam._num_classes(model, variables, images.shape)
    return gradcam._check_targets(targets, images.shape[0], classes)


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
    """ReLU whose backward pass lets through only positive gradients at positive inputs (guided backpropagation)."""
    return jax.nn.relu(x)


def _guided_relu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.nn.relu(x), x


def _guided_relu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (jnp.where((x > 0) & (g > 0), g, 0.0),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


@functools.partial(lazy_jit, static_argnames=("model", "target"))
def _guided_backprop(
    model: nn.Module, target: str, variables: dict[str, Any], images: jax.Array, targets: jax.Array | None
) -> jax.Array:
    guided = model.clone(activation=guided_relu)

    def score(x: jax.Array) -> jax.Array:
        logits = guided.apply(variables, x, train=False)
        chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32) if targets is None else targets
        return jnp.sum(target_scores(logits, chosen, target))

    return jax.grad(score)(images)


def guided_backprop(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    targets: jax.Array | Sequence[int] | None = None,
    *,
    target: str = "logit",
) -> jax.Array:
    """Guided backpropagation (Springenberg et al., 2015): the gradient of each image's target score with
    respect to the image, every ReLU passing back only positive gradients at positive inputs, as
    pytorch-grad-cam's ``GuidedBackpropReLUModel`` (which takes one image; here a batch, a target per image).

    ``model`` must have an ``activation`` field (the zoo's ResNets), swapped for ``guided_relu``. Returns
    (B, H, W, C) in the images' dtype. Raises ValueError for a model without that field, bad images or targets.
    """
    if "activation" not in getattr(model, "__dataclass_fields__", {}):
        raise ValueError(
            f"guided backpropagation needs a model with an activation field; {type(model).__name__} has none"
        )
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    images = jnp.asarray(images)
    gradcam._check_images(model, variables, images)
    if targets is not None:
        targets = _checked_targets(model, variables, images, targets)
    return _guided_backprop(model, target, gradcam._model_variables(variables), images, targets)


def guided_grad_cam(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    layer: str = "layer3",
    method: str = "gradcam",
    targets: jax.Array | Sequence[int] | None = None,
    **options: Any,
) -> jax.Array:
    """Guided Grad-CAM: ``cam(...)`` maps times ``guided_backprop`` (B, H, W, C), for the same targets
    (default: each image's predicted class). ``options`` go to ``cam`` (``target`` to both)."""
    maps = cam(model, variables, images, layer, method, targets, **options)
    guided = guided_backprop(model, variables, images, targets, target=options.get("target", "logit"))
    return maps[..., None].astype(guided.dtype) * guided
