"""The CAM family without torch: weightings against a NumPy transcription of pytorch-grad-cam's
definitions (NCHW, as its code is written), the Eigen sign convention, resampling and ablation rules,
``cam`` under ``jax.jit``, and the argument checks. The comparison with pytorch-grad-cam itself is in
tests/test_cam_torch.py."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcifar import cam, models
from jaxcifar.state import init_variables


@pytest.fixture(scope="module")
def activations_and_grads():
    """Random A >= 0 (as after a ReLU, with exact zeros) and G of either sign, NHWC (3, 5, 6, 7)."""
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(3, 5, 6, 7)), 0.0)
    g = rng.normal(size=(3, 5, 6, 7)) * (rng.uniform(size=(3, 5, 6, 7)) > 0.2)  # some exact zeros
    return a, g


def _numpy_weighted(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam 1.5.7's weighted activations (B, C, h, w), transcribed on NCHW arrays."""
    a, g = a.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2)
    sum_a = a.sum(axis=(2, 3))[:, :, None, None]
    if method == "gradcam":
        return g.mean(axis=(2, 3))[:, :, None, None] * a
    if method in ("hirescam", "eigengradcam"):
        return g * a
    if method == "gradcamelementwise":
        return np.maximum(g * a, 0)
    if method == "gradcam++":
        aij = g**2 / (2 * g**2 + sum_a * g**3 + 0.000001)
        aij = np.where(g != 0, aij, 0)
        return (np.maximum(g, 0) * aij).sum(axis=(2, 3))[:, :, None, None] * a
    if method == "xgradcam":
        return (g * a / (sum_a + 1e-7)).sum(axis=(2, 3))[:, :, None, None] * a
    if method == "layercam":
        return np.maximum(g, 0) * a
    assert method == "eigencam"
    return a


@pytest.mark.parametrize("method", list(cam.GRADIENT_METHODS))
def test_weightings_match_numpy_transcription(activations_and_grads, method):
    a, g = activations_and_grads
    weigh = cam.GRADIENT_METHODS[method][0]
    ours = np.asarray(weigh(jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32)))
    chex.assert_shape(ours, a.shape)
    np.testing.assert_allclose(ours, _numpy_weighted(method, a, g).transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (2, 2, 3, 11)], ids=["more-positions", "more-channels"])
def test_eigen_projection_is_the_first_principal_component_signed_by_the_channel_sum(shape):
    a = np.maximum(np.random.default_rng(1).normal(size=shape), 0.0)
    ours = np.asarray(cam.eigen_projection(jnp.asarray(a, jnp.float32)))
    chex.assert_shape(ours, a.shape[:3])
    for image, projection in zip(a, ours, strict=True):
        flat = image.reshape(-1, image.shape[-1])
        centered = flat - flat.mean(axis=0)
        expected = (centered @ np.linalg.svd(centered)[2][0]).reshape(image.shape[:2])
        np.testing.assert_allclose(np.abs(projection), np.abs(expected), rtol=1e-4, atol=1e-5)
        assert np.sum(projection * image.sum(axis=-1)) > 0  # the convention
    # Invariant under negating the solver's answer: negated activations give the negated projection.
    np.testing.assert_allclose(cam.eigen_projection(-jnp.asarray(a, jnp.float32)), -ours, rtol=1e-4, atol=1e-5)


def test_align_corners_matrix_hits_the_corners():
    np.testing.assert_allclose(cam.align_corners_matrix(2, 3), [[1, 0], [0.5, 0.5], [0, 1]])
    matrix = cam.align_corners_matrix(8, 32)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    np.testing.assert_allclose(matrix[[0, -1]], np.eye(8)[[0, -1]])


def test_score_cam_masks_are_scaled_per_channel(activations_and_grads):
    a, _ = activations_and_grads
    masks = np.asarray(cam.score_cam_masks(jnp.asarray(a, jnp.float32), (10, 12)))
    chex.assert_shape(masks, (3, 7, 10, 12))
    np.testing.assert_allclose(masks.min(axis=(2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(masks.max(axis=(2, 3)), 1.0, atol=1e-6)


def test_ablated_values_zero_after_relu_else_far_below_the_minimum():
    after_relu = jnp.stack([jnp.zeros((2, 2, 3)).at[0, 0, 0].set(5.0), jnp.full((2, 2, 3), 0.5)])
    np.testing.assert_allclose(cam.ablated_values(after_relu), [0.0, 0.5 - 1e7])


def test_augmented_views_are_flips_times_brightness():
    images = jnp.arange(2 * 2 * 3 * 1, dtype=jnp.float32).reshape(2, 2, 3, 1)
    views = cam.augmented_views(images)
    chex.assert_shape(views, (6, 2, 2, 3, 1))
    np.testing.assert_allclose(views[1], images)
    np.testing.assert_allclose(views[3], 0.9 * images[:, :, ::-1])
    np.testing.assert_allclose(views[5], 1.1 * images[:, :, ::-1])


@pytest.fixture(scope="module")
def tiny():
    model = models.get_model("resnet18", width=4)
    variables = init_variables(model, jax.random.PRNGKey(0))
    return model, variables, jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))


def test_cam_runs_under_jit_with_traced_targets(tiny):
    model, variables, images = tiny
    targets = jnp.asarray([1, 2, 3])
    eager = cam.cam(model, variables, images, "layer3", "layercam", targets=targets)
    jitted = jax.jit(lambda v, x, t: cam.cam(model, v, x, "layer3", "layercam", targets=t))(variables, images, targets)
    chex.assert_shape(jitted, (3, 32, 32))
    chex.assert_trees_all_close(jitted, eager, atol=1e-5)
    assert float(jitted.max()) > 0.99


def test_a_repeated_call_runs_no_model_code(tiny):
    """The second call on the same model, shapes and options neither traces the model (the shape checks
    are cached) nor compiles again: not one Linen module method runs."""
    model, variables, images = tiny
    first = cam.cam(model, variables, images, "layer3", "gradcam++", targets=[1, 2, 3])
    calls = []

    def count(next_fun, args, kwargs, context):
        calls.append(f"{type(context.module).__name__}.{context.method_name}")
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(count):
        again = cam.cam(model, dict(variables), images, "layer3", "gradcam++", targets=[1, 2, 3])
    assert calls == []
    chex.assert_trees_all_equal(again, first)


def test_cached_perturbation_shapes_keep_fullgrad_apart(tiny):
    """The cached abstract forward is keyed by its interceptor: FullGrad's perturbations (one per
    BatchNorm) after the plain ones (one per stage) of the same model, and the plain ones again after."""
    model, variables, images = tiny
    plain = cam._zero_perturbations(model, variables, images)
    full = cam._zero_perturbations(model, variables, images, cam._fullgrad_interceptor)
    assert set(plain) == {"layer1", "layer2", "layer3", "layer4"}
    leaves = jax.tree_util.tree_leaves_with_path(full)
    assert sum(str(path[-1].key) == "fullgrad" for path, _ in leaves) == 20  # stem + 2 per block + 3 shortcuts
    chex.assert_trees_all_equal_shapes(cam._zero_perturbations(model, variables, images), plain)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "gradcam+"}, r"unknown CAM method 'gradcam\+'; available: gradcam, hirescam,"),
        ({"target": "probability"}, r"unknown target 'probability'; available: logit, softmax"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"targets": [1, 2]}, r"targets must have shape \(3,\)"),
        ({"layer": "layer4"}, r"layer4 is 4x4 for 32x32 inputs"),
    ],
)
def test_bad_arguments_are_rejected_in_one_line(tiny, kwargs, message):
    model, variables, images = tiny
    with pytest.raises(ValueError, match=message) as error:
        cam.cam(model, variables, images, **kwargs)
    assert "\n" not in str(error.value)


def test_guided_relu_passes_back_only_positive_gradients_at_positive_inputs():
    x = jnp.asarray([-1.0, 2.0, 3.0, 0.0])
    g = jnp.asarray([5.0, -4.0, 6.0, 7.0])
    value, vjp = jax.vjp(cam.guided_relu, x)
    np.testing.assert_allclose(value, [0.0, 2.0, 3.0, 0.0])
    np.testing.assert_allclose(vjp(g)[0], [0.0, 0.0, 6.0, 0.0])


def test_guided_backprop_needs_an_activation_field(tiny):
    _, variables, images = tiny
    bare = type("Bare", (), {"__dataclass_fields__": {}})()
    with pytest.raises(ValueError, match="needs a model with an activation field; Bare has none"):
        cam.guided_backprop(bare, variables, images)
