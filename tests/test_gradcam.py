"""Grad-CAM: shapes, batch invariances, the 5-pixel rule, and agreement with independent references.

The references (classic CAM at layer4, and a NumPy pipeline at layer2/layer3) follow the definition of
pytorch-grad-cam's GradCAM: ReLU, min-max, cv2-style bilinear resize (half-pixel centers, clamped
border), min-max again.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcifar import gradcam, models
from jaxcifar.state import init_variables

BATCH = 5


def _randomize_batch_stats(variables: dict, key: jax.Array) -> dict:
    """Running means ~ N(0, 0.2) and variances ~ U(0.5, 1.5), as after some training."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables["batch_stats"])
    keys = jax.random.split(key, len(leaves))
    new = []
    for (path, leaf), k in zip(leaves, keys, strict=True):
        if path[-1].key == "mean":
            new.append(0.2 * jax.random.normal(k, leaf.shape))
        else:
            new.append(jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5))
    return {**variables, "batch_stats": jax.tree.unflatten(treedef, new)}


@pytest.fixture(scope="module")
def setup():
    model = models.get_model("resnet18", width=4)
    variables = _randomize_batch_stats(init_variables(model, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    images = jax.random.normal(jax.random.PRNGKey(2), (BATCH, 32, 32, 3))
    return model, variables, images


@pytest.fixture(scope="module")
def cams(setup):
    model, variables, images = setup
    return gradcam.grad_cam(model, variables, images)


def _scale_linear(variables: dict, factor: float) -> dict:
    params = dict(variables["params"])
    params["linear"] = jax.tree.map(lambda p: p * factor, params["linear"])
    return {**variables, "params": params}


# ----------------------------------------------------------------------------- NumPy reference


def _np_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of cv2 INTER_LINEAR: half-pixel centers, source index clamped to the border."""
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    low = np.floor(src).astype(int)
    frac = src - low
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, np.clip(low, 0, n_in - 1)), 1.0 - frac)
    np.add.at(matrix, (rows, np.clip(low + 1, 0, n_in - 1)), frac)
    return matrix


def _np_scale_cam(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image(cam, size) then scale_cam_image(result), in float64."""

    def minmax(x: np.ndarray) -> np.ndarray:
        x = x - x.min(axis=(1, 2), keepdims=True)
        return x / (1e-7 + x.max(axis=(1, 2), keepdims=True))

    rows = _np_bilinear_matrix(cams.shape[1], size[0])
    cols = _np_bilinear_matrix(cams.shape[2], size[1])
    resized = np.einsum("Hh,bhw,Ww->bHW", rows, minmax(np.asarray(cams, np.float64)), cols)
    return minmax(resized)


def _np_grad_cam(activation: np.ndarray, grads: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """GradCAM from A and G (B, h, w, C): channel weights = spatial mean of G, ReLU of the weighted sum."""
    weights = grads.mean(axis=(1, 2))
    cams = np.maximum((activation * weights[:, None, None, :]).sum(axis=-1), 0.0)
    return _np_scale_cam(cams, size)


def _activation_and_logit_jacobian(model, variables, images, layer):
    """A at ``layer`` (B, h, w, C) and the full Jacobian d logits / d A (B, classes, B, h, w, C), in NumPy."""
    _, abstract = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["perturbations"]), variables, images
    )
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract["perturbations"])

    def logits_fn(delta):
        perturbations = {**zeros, layer: delta}
        logits, state = model.apply(
            {**variables, "perturbations": perturbations}, images, train=False, mutable=["intermediates"]
        )
        return logits, state["intermediates"][layer][0]

    jacobian, activation = jax.jit(jax.jacrev(logits_fn, has_aux=True))(zeros[layer])
    return np.asarray(activation, np.float64), np.asarray(jacobian, np.float64)


# ----------------------------------------------------------------------------- shapes and invariances


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_shape_dtype_range(setup, batch):
    model, variables, images = setup
    out = gradcam.grad_cam(model, variables, images[:batch])
    chex.assert_shape(out, (batch, 32, 32))
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1.0, atol=1e-5)  # non-trivial maps, normalized
    np.testing.assert_allclose(out.min(axis=(1, 2)), 0.0, atol=1e-6)


def test_batch_equals_single_image_calls(setup, cams):
    model, variables, images = setup
    singles = jnp.concatenate([gradcam.grad_cam(model, variables, images[i : i + 1]) for i in range(BATCH)])
    chex.assert_trees_all_close(cams, singles, atol=1e-5)


def test_permuting_the_batch_permutes_the_maps(setup, cams):
    model, variables, images = setup
    perm = np.array([3, 0, 4, 2, 1])
    chex.assert_trees_all_close(gradcam.grad_cam(model, variables, images[perm]), cams[perm], atol=1e-5)


def test_scaling_the_final_layer_leaves_maps_unchanged(setup, cams):
    model, variables, images = setup
    scaled = gradcam.grad_cam(model, _scale_linear(variables, 3.7), images)
    chex.assert_trees_all_close(scaled, cams, atol=1e-4)


def test_default_targets_are_the_argmax_and_targets_matter(setup, cams):
    model, variables, images = setup
    predicted = jnp.argmax(model.apply(variables, images, train=False), axis=-1)
    chex.assert_trees_all_close(gradcam.grad_cam(model, variables, images, targets=predicted), cams, atol=1e-6)
    other = gradcam.grad_cam(model, variables, images, targets=(predicted + 1) % 10)
    assert float(jnp.abs(other - cams).max()) > 0.1


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize(("size", "allow_small"), [(32, True), (64, False)])
def test_layer4_equals_classic_cam(setup, size, allow_small):
    """At the last stage (global average pool then Dense), G = W[:, c] / (h w): GradCAM is Zhou et al.'s CAM."""
    model, variables, _ = setup
    images = jax.random.normal(jax.random.PRNGKey(3), (3, size, size, 3))
    out = gradcam.grad_cam(model, variables, images, layer="layer4", allow_small=allow_small)
    logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(variables, images)
    activation = np.asarray(state["intermediates"]["layer4"][0], np.float64)
    kernel = np.asarray(variables["params"]["linear"]["kernel"], np.float64)  # (channels, classes)
    class_weights = kernel[:, np.asarray(jnp.argmax(logits, axis=-1))].T  # (B, channels)
    cam = np.maximum(np.einsum("bhwk,bk->bhw", activation, class_weights), 0.0)
    chex.assert_shape(out, (3, size, size))
    np.testing.assert_allclose(out, _np_scale_cam(cam, (size, size)), atol=2e-5)


@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_matches_numpy_reference(setup, layer):
    """A and the logit Jacobian from JAX; target selection, batch sum, weights, ReLU, scaling in NumPy."""
    model, variables, images = setup
    targets = np.array([7, 0, 3, 9, 3])  # not the predictions
    out = gradcam.grad_cam(model, variables, images, layer=layer, targets=targets)
    activation, jacobian = _activation_and_logit_jacobian(model, variables, images, layer)
    score_grad = jacobian[np.arange(BATCH), targets].sum(axis=0)  # d (sum_b logit[b, t_b]) / dA
    expected = _np_grad_cam(activation, score_grad, (32, 32))
    np.testing.assert_allclose(out, expected, atol=2e-5)
    # Eval-mode BatchNorm: image b's logits do not depend on image b' activations.
    cross = jacobian[np.arange(BATCH), targets][~np.eye(BATCH, dtype=bool)]
    assert np.abs(cross).max() == 0.0


@pytest.mark.parametrize(
    ("small", "size"), [((8, 8), (32, 32)), ((4, 4), (32, 32)), ((5, 3), (13, 11)), ((8, 8), (5, 5))]
)
def test_scale_cam_resize_matches_cv2_bilinear_definition(small, size):
    maps = jax.random.normal(jax.random.PRNGKey(4), (2, *small))
    out = gradcam.scale_cam(maps, size)
    chex.assert_shape(out, (2, *size))
    np.testing.assert_allclose(out, _np_scale_cam(np.asarray(maps), size), atol=1e-6)


def test_constant_or_zero_maps_give_zeros_not_nan(setup):
    for value in (0.0, 3.5, -2.0):
        out = gradcam.scale_cam(jnp.full((2, 8, 8), value), (32, 32))
        chex.assert_trees_all_equal(out, jnp.zeros((2, 32, 32)))
    model, variables, images = setup
    out = gradcam.grad_cam(model, _scale_linear(variables, 0.0), images)  # G = 0 everywhere
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_equal(out, jnp.zeros_like(out))


# ----------------------------------------------------------------------------- the 5-pixel rule


def test_layer4_at_32x32_is_refused_with_a_clear_message(setup):
    model, variables, images = setup
    expected = (
        r"layer4 is 4x4 for 32x32 inputs, smaller than 5x5: too coarse for Grad-CAM\. "
        r"Layers large enough: layer1 \(32x32\), layer2 \(16x16\), layer3 \(8x8\)\. Pass allow_small=True"
    )
    with pytest.raises(ValueError, match=expected):
        gradcam.grad_cam(model, variables, images, layer="layer4")


def test_layer_resolutions_depend_on_input_size(setup):
    model, variables, _ = setup
    assert gradcam.layer_resolution(model, variables, (32, 32, 3), "layer3") == (8, 8)
    assert gradcam.layer_resolution(model, variables, (2, 64, 64, 3), "layer4") == (8, 8)
    assert gradcam.check_layer(model, variables, (64, 64, 3), "layer4") == (8, 8)
    assert list(gradcam.layer_resolutions(model, variables, (32, 32, 3))) == list(models.STAGE_NAMES)


def test_unknown_layer_and_bad_targets_are_rejected(setup):
    model, variables, images = setup
    with pytest.raises(ValueError, match="unknown layer 'layer9'; available: layer1, layer2, layer3, layer4"):
        gradcam.grad_cam(model, variables, images, layer="layer9")
    with pytest.raises(ValueError, match="targets must have shape"):
        gradcam.grad_cam(model, variables, images, targets=[1, 2])


@pytest.mark.parametrize(
    "targets, message",
    [
        ([0, 1, 2, 3, 15], r"targets must be classes in \[0, 10\), got \[15\]"),  # was an all-zero map
        ([0, -1, 2, 3, 4], r"targets must be classes in \[0, 10\), got \[-1\]"),  # was wrapped to class 9
        ([0.0, 1.7, 2.0, 3.0, 4.0], r"targets must be integer classes in \[0, 10\), got float64"),  # was truncated
    ],
)
def test_targets_out_of_range_or_not_integers_are_rejected(setup, targets, message):
    model, variables, images = setup
    with pytest.raises(ValueError, match=message) as error:
        gradcam.grad_cam(model, variables, images, targets=targets)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((2, 3, 32, 32), jnp.float32, r"images must be \(B, H, W, 3\) \(NHWC\), got shape \(2, 3, 32, 32\) \(NCHW\?"),
        ((2, 32, 32, 1), jnp.float32, r"images must be \(B, H, W, 3\) \(NHWC\), got shape \(2, 32, 32, 1\)$"),
        ((0, 32, 32, 3), jnp.float32, r"at least one image .* got an empty batch \(0, 32, 32, 3\)"),
        ((2, 32, 32, 3), jnp.uint8, r"images must be normalized floats .* got uint8"),
        ((32, 32, 3), jnp.float32, r"images must be \(B, H, W, 3\) \(NHWC\), got shape \(32, 32, 3\)"),
    ],
)
def test_images_that_are_not_a_float_nhwc_batch_are_rejected(setup, shape, dtype, message):
    model, variables, _ = setup
    with pytest.raises(ValueError, match=message) as error:
        gradcam.grad_cam(model, variables, jnp.zeros(shape, dtype))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- overlay


def test_overlay_blends_jet_heatmap_over_image():
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(2, 8, 8, 3)).astype(np.float32)
    cam = rng.uniform(size=(2, 8, 8)).astype(np.float32)
    out = gradcam.overlay(image, cam, alpha=0.4)
    chex.assert_shape(out, (2, 8, 8, 3))
    chex.assert_type(out, np.float32)
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(gradcam.overlay(image, cam, alpha=0.0), image)
    hot = gradcam.overlay(image[0], np.ones((8, 8)), alpha=1.0)  # jet's top is dark red
    np.testing.assert_allclose(hot[0, 0], [0.5, 0.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        gradcam.overlay(image, cam, alpha=1.5)
