"""The CAM family against pytorch-grad-cam 1.5.7 on the same weights: maps within 1e-4 on [0, 1].

A kuangliu ResNet18 (``jaxcifar.torch_resnet``, width 8, non-trivial BatchNorm state) and its
jaxcifar variables through ``jaxcifar.interop``; 16 random images; a target class per image. Both
sides run in float64: in float32 a ReLU input within rounding of zero can flip between the libraries
and move one image's map by ~1e-3 (see test_torch_equivalence.py), which would test rounding luck,
not the definitions. The Eigen methods (and ``eigen_smooth``) are compared up to the sign of the
principal component: pytorch-grad-cam takes ``np.linalg.svd``'s, so each image must equal
pytorch-grad-cam's map or the map it gives with the projection negated.

The quick tests take A and G from one compiled gradient per layer and check every gradient weighting;
the slow ones run ``cam`` end to end for every method, layer and option. Needs torch and grad-cam:
skipped without them, failing instead when JAXCIFAR_REQUIRE_TORCH=1 (CI).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.torch_support import require

pytestmark = pytest.mark.torch
torch = require("torch")
pgc = require("pytorch_grad_cam")

from pytorch_grad_cam.utils import model_targets  # noqa: E402

from jaxcifar import cam, cam_metrics, interop, models  # noqa: E402
from jaxcifar.torch_resnet import make_resnet  # noqa: E402

torch.set_num_threads(1)

WIDTH = 8
TARGETS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]
TOLERANCE = 1e-4
EIGEN = ("eigencam", "eigengradcam")
REFERENCE = {
    "gradcam": "GradCAM",
    "hirescam": "HiResCAM",
    "gradcamelementwise": "GradCAMElementWise",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
    "fullgrad": "FullGrad",  # ignores the layer: every BatchNorm (and biased convolution) and the input
}
# Modules of pytorch-grad-cam that call get_2d_projection (patched to apply jaxcifar's sign convention).
_PROJECTING = (
    "base_cam",
    "hirescam",
    "grad_cam_elementwise",
    "layer_cam",
    "eigen_cam",
    "eigen_grad_cam",
    "fullgrad_cam",
)


@pytest.fixture(scope="module")
def pair():
    """(torch ResNet18 float64, jaxcifar float64 variables, the float64 Linen model, 16 images (torch NCHW))."""
    net = make_resnet("resnet18", width=WIDTH, seed=3).double()
    x = torch.randn(len(TARGETS), 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with jax.enable_x64(True):
        variables = interop.load_torch_state_dict(net.state_dict(), "resnet18")
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    return net, variables, models.get_model("resnet18", width=WIDTH, dtype=jnp.float64), x


def _nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@contextlib.contextmanager
def _signed_projection() -> Iterator[None]:
    """pytorch-grad-cam with jaxcifar's sign convention on its principal components: each projection
    negated where it correlates negatively with the channel sum of what was projected."""
    import importlib

    from pytorch_grad_cam.utils import svd_on_activations

    original = svd_on_activations.get_2d_projection

    def signed(batch: np.ndarray) -> np.ndarray:
        projection = original(batch)
        agreement = np.sum(projection * np.nan_to_num(batch).sum(axis=1), axis=(1, 2))
        return np.where(agreement[:, None, None] < 0, -projection, projection)

    modules = [importlib.import_module(f"pytorch_grad_cam.{name}") for name in _PROJECTING]
    try:
        for module in modules:
            module.get_2d_projection = signed
        yield
    finally:
        for module in modules:
            module.get_2d_projection = original


def reference(
    net, layer: str, method: str, x, target: str = "logit", aug_smooth: bool = False, eigen_smooth: bool = False
) -> np.ndarray:
    """pytorch-grad-cam's maps (B, 32, 32) of ``method`` with ``TARGETS``."""
    kind = model_targets.ClassifierOutputSoftmaxTarget if target == "softmax" else model_targets.ClassifierOutputTarget
    with getattr(pgc, REFERENCE[method])(model=net, target_layers=[getattr(net, layer)]) as explainer:
        return explainer(
            input_tensor=x, targets=[kind(t) for t in TARGETS], aug_smooth=aug_smooth, eigen_smooth=eigen_smooth
        )


def assert_maps_match(ours: np.ndarray, ref: np.ndarray) -> None:
    """Every map within TOLERANCE of ``ref``'s, and most of them real (a map whose weighted sum is negative
    everywhere is legitimately all zeros, but all-zero maps compare nothing; aug_smooth's averages of
    6 maps in [0, 1] peak below 1)."""
    assert ours.shape == ref.shape == (len(TARGETS), 32, 32)
    assert np.sum(ref.max(axis=(1, 2)) > 0.5) >= len(ref) // 2, ref.max(axis=(1, 2))
    per_image = np.abs(ours - ref).reshape(len(ref), -1).max(axis=1)
    assert per_image.max() <= TOLERANCE, per_image


def compare(net, layer: str, method: str, x, ours: np.ndarray, **options) -> None:
    """``ours`` against pytorch-grad-cam; where a principal component is taken, with the sign fixed as
    jaxcifar fixes it (pytorch-grad-cam's own sign is the SVD's: each image's map then equals one of the
    two; ``test_eigen_maps_equal_pytorch_grad_cam_up_to_sign`` checks that without the convention)."""
    projected = method in EIGEN or options.get("eigen_smooth", False)
    with _signed_projection() if projected else contextlib.nullcontext():
        ref = reference(net, layer, method, x, **options)
    assert_maps_match(ours, ref)


# The masked-forward methods: thousands of forwards per call, which run ~13x slower with most of XLA's
# optimizations off (conftest turns them off, since they mostly cost compile time): 17 s against 1.3 s for
# ScoreCAM at layer3 here.
FORWARD_HEAVY = ("scorecam", "ablationcam")


@pytest.fixture
def xla_optimized_for(request):
    """``xla_optimized_for(method)``: XLA's optimizations on for the rest of the test when ``method`` is one of
    FORWARD_HEAVY (put back as they were afterwards)."""
    before = jax.config.read("jax_disable_most_optimizations")

    def switch(method: str) -> None:
        if method in FORWARD_HEAVY:
            jax.config.update("jax_disable_most_optimizations", False)

    yield switch
    jax.config.update("jax_disable_most_optimizations", before)


@functools.cache
def _gradients(layer: str):
    """``cam.activations_and_gradients`` at ``layer``, jitted (one compile per layer)."""
    return jax.jit(functools.partial(cam.activations_and_gradients, layer=layer), static_argnames=("model",))


@pytest.mark.parametrize("layer", ["layer3", pytest.param("layer2", marks=pytest.mark.slow)])
def test_gradient_weightings_match_pytorch_grad_cam(pair, layer):
    """A and G from one compiled gradient; every weighting of GRADIENT_METHODS, plain and eigen_smooth."""
    net, variables, model, x = pair
    with jax.enable_x64(True):
        targets = jnp.asarray(TARGETS, jnp.int32)
        activation, grads, _, chosen = _gradients(layer)(
            model=model, variables=variables, images=_nhwc(x), targets=targets
        )
        np.testing.assert_array_equal(chosen, TARGETS)
        for method in cam.GRADIENT_METHODS:
            for smooth in (False, True) if method not in EIGEN else (False,):
                ours = np.asarray(cam.gradient_maps(method, activation, grads, (32, 32), eigen_smooth=smooth))
                compare(net, layer, method, x, ours, eigen_smooth=smooth)


def test_eigen_maps_equal_pytorch_grad_cam_up_to_sign(pair):
    """Without the sign convention on pytorch-grad-cam's side: each map equals its map or the one it gives
    for the negated projection, and both cases occur (the convention is not the SVD's sign)."""
    net, variables, model, x = pair
    with jax.enable_x64(True):
        ours = np.asarray(cam.cam(model, variables, _nhwc(x), "layer3", "eigencam", targets=TARGETS))
    plain = reference(net, "layer3", "eigencam", x)
    from pytorch_grad_cam.utils import svd_on_activations

    original = svd_on_activations.get_2d_projection
    module = __import__("pytorch_grad_cam.eigen_cam", fromlist=["get_2d_projection"])
    module.get_2d_projection = lambda batch: -original(batch)
    try:
        negated = reference(net, "layer3", "eigencam", x)
    finally:
        module.get_2d_projection = original
    same = np.abs(ours - plain).reshape(len(ours), -1).max(axis=1) <= TOLERANCE
    flipped = np.abs(ours - negated).reshape(len(ours), -1).max(axis=1) <= TOLERANCE
    assert np.all(same | flipped), (same, flipped)
    assert same.any() and flipped.any()


def test_cam_end_to_end_matches_pytorch_grad_cam(pair):
    net, variables, model, x = pair
    with jax.enable_x64(True):
        ours = np.asarray(cam.cam(model, variables, _nhwc(x), "layer3", "gradcam++", targets=TARGETS))
    compare(net, "layer3", "gradcam++", x, ours)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["layer3", "layer2"])
@pytest.mark.parametrize("method", cam.METHODS)
def test_every_method_matches_pytorch_grad_cam(pair, layer, method, xla_optimized_for):
    net, variables, model, x = pair
    xla_optimized_for(method)
    with jax.enable_x64(True):
        ours = np.asarray(cam.cam(model, variables, _nhwc(x), layer, method, targets=TARGETS, batch_size=48))
    compare(net, layer, method, x, ours)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, options",
    [
        ("gradcam", {"target": "softmax"}),
        ("scorecam", {"target": "softmax"}),
        ("ablationcam", {"target": "softmax"}),
        ("gradcam++", {"aug_smooth": True}),
        ("eigencam", {"aug_smooth": True}),
        ("scorecam", {"eigen_smooth": True}),
        ("fullgrad", {"eigen_smooth": True}),
        ("layercam", {"eigen_smooth": True, "aug_smooth": True, "target": "softmax"}),
    ],
)
def test_options_match_pytorch_grad_cam(pair, method, options, xla_optimized_for):
    """Softmax targets, aug_smooth (6 views, each with the given targets), eigen_smooth, at layer3."""
    net, variables, model, x = pair
    xla_optimized_for(method)
    if options.get("aug_smooth"):
        require("ttach")
    with jax.enable_x64(True):
        ours = np.asarray(cam.cam(model, variables, _nhwc(x), "layer3", method, targets=TARGETS, **options))
    compare(net, "layer3", method, x, ours, **options)


@pytest.mark.slow
def test_faithfulness_metrics_match_pytorch_grad_cam(pair):
    """Confidence change (and drop / increase) and ROAD (zero noise; percentiles and "auto") on
    pytorch-grad-cam's own maps, in float32 (pytorch-grad-cam's imputer writes float32 values into the image)."""
    from pytorch_grad_cam.metrics import cam_mult_image, perturbation_confidence, road

    net, _, _, x = pair
    net, x = copy.deepcopy(net).float(), x.float()
    variables = interop.load_torch_state_dict(net.state_dict(), "resnet18")
    model = models.get_model("resnet18", width=WIDTH)
    maps = reference(net, "layer3", "gradcam", x)
    wrapped = [model_targets.ClassifierOutputTarget(t) for t in TARGETS]
    expected = {
        "change": cam_mult_image.CamMultImageConfidenceChange()(x, maps, wrapped, net),
        "drop": cam_mult_image.DropInConfidence()(x, maps, wrapped, net),
        "increase": cam_mult_image.IncreaseInConfidence()(x, maps, wrapped, net),
    }
    for name, percentile, remove in (
        ("morf", 80, perturbation_confidence.RemoveMostRelevantFirst),
        ("lerf", 30, perturbation_confidence.RemoveLeastRelevantFirst),
        ("morf_auto", "auto", perturbation_confidence.RemoveMostRelevantFirst),
        ("lerf_auto", "auto", perturbation_confidence.RemoveLeastRelevantFirst),
    ):
        metric = perturbation_confidence.PerturbationConfidenceMetric(
            remove(percentile, road.NoisyLinearImputer(noise=0.0))
        )
        expected[name] = metric(x, maps, wrapped, net)
    args = (model, variables, _nhwc(x), maps, TARGETS)
    ours = {
        "change": cam_metrics.confidence_change(*args),
        "drop": cam_metrics.drop_in_confidence(*args),
        "increase": cam_metrics.increase_in_confidence(*args),
        "morf": cam_metrics.road(*args, most_relevant_first=True),
        "lerf": cam_metrics.road(*args, percentile=30, most_relevant_first=False),
        "morf_auto": cam_metrics.road(*args, percentile="auto", most_relevant_first=True),
        "lerf_auto": cam_metrics.road(*args, percentile="auto", most_relevant_first=False),
    }
    noisy = cam_metrics.road(*args, noise=0.01, key=jax.random.PRNGKey(0))
    together = cam_metrics.faithfulness(*args)  # the report's one call: the same numbers
    for name, key in (("change", "confidence_change"), ("morf", "road_morf"), ("increase", "increase_in_confidence")):
        np.testing.assert_allclose(together[key], expected[name], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(
        together["road_lerf"], cam_metrics.road(*args, most_relevant_first=False), rtol=1e-4, atol=1e-6
    )
    for name, values in expected.items():
        assert values.shape == (len(TARGETS),)
        np.testing.assert_allclose(np.asarray(ours[name]), values, rtol=1e-4, atol=1e-6, err_msg=name)
    assert 0 < expected["increase"].sum() < len(TARGETS) and np.abs(expected["morf"]).max() > 1e-3
    assert np.abs(expected["morf_auto"]).max() > 1e-3 and np.abs(expected["lerf_auto"]).max() > 1e-3
    assert 0 < np.abs(np.asarray(noisy) - expected["morf"]).max() < 0.5  # seeded noise moves the scores a little


def _with_relu_modules(net):
    """A copy of the kuangliu ResNet whose ReLUs are ``torch.nn.ReLU`` modules (it calls ``F.relu``), the
    only ones pytorch-grad-cam's guided backpropagation swaps."""
    import types

    import torch.nn.functional as F

    net = copy.deepcopy(net)

    def block_forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in stage:
            block.relu1, block.relu2 = torch.nn.ReLU(), torch.nn.ReLU()
            block.forward = types.MethodType(block_forward, block)
    net.relu = torch.nn.ReLU()
    net.forward = types.MethodType(forward, net)
    return net


@pytest.mark.slow
def test_guided_backprop_and_guided_grad_cam_match_pytorch_grad_cam(pair):
    """On a copy built with nn.ReLU modules (pytorch-grad-cam's GuidedBackpropReLUModel takes one image and
    one class per call); on the original, which calls F.relu, its "guided" gradient is the plain one."""
    from pytorch_grad_cam import GuidedBackpropReLUModel

    net, variables, model, x = pair
    modules = _with_relu_modules(net)
    guided = GuidedBackpropReLUModel(model=modules, device="cpu")
    expected = np.stack([guided(x[i : i + 1].clone(), target_category=t) for i, t in enumerate(TARGETS)])
    with jax.enable_x64(True):
        ours = np.asarray(cam.guided_backprop(model, variables, _nhwc(x), TARGETS))
        combined = np.asarray(cam.guided_grad_cam(model, variables, _nhwc(x), "layer3", "gradcam", TARGETS))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6 * scale)
    maps = reference(modules, "layer3", "gradcam", x)
    np.testing.assert_allclose(combined, maps[..., None] * expected, rtol=0, atol=1e-4 * scale)

    unguided = GuidedBackpropReLUModel(model=net, device="cpu")
    plain = np.stack([unguided(x[i : i + 1].clone(), target_category=t) for i, t in enumerate(TARGETS)])
    inputs = x.clone().requires_grad_(True)
    net(inputs)[torch.arange(len(TARGETS)), torch.tensor(TARGETS)].sum().backward()
    np.testing.assert_allclose(plain, inputs.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-12 * scale)
    assert np.abs(plain - expected).max() > 0.1 * scale  # guided backpropagation does change the gradient
