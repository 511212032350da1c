"""Numerical equivalence with PyTorch: logits, state_dict round trip, pytorch-grad-cam, SGD + OneCycleLR.

The reference is ``jaxcifar.torch_resnet`` (kuangliu/pytorch-cifar's ResNet, PyTorch defaults) with
non-trivial BatchNorm statistics and affine values. Needs torch (and ``grad-cam`` for the Grad-CAM
comparison): skipped without them, failing instead when JAXCIFAR_REQUIRE_TORCH=1 (CI).

Tolerances (measured on x86_64, torch 2.13/2.14). Logits: max |jax - torch| <= 1e-4 * max |torch|
(measured 2e-7..4e-6). Grad-CAM maps in [0, 1]: max abs difference <= 1e-4 (measured 5e-7..3e-6).
Training: per-step losses and final weights within 1e-4 relative, run in float64 on both sides
(measured 2e-12 and 1e-11). Not in float32: there rounding flips the sign of ReLU inputs within ~1e-7
of zero, whose gradient then jumps between 0 and 1; over these 10 steps PyTorch float32 ends 3e-2
(losses) and 1e-1 (weights) away from PyTorch float64, and jaxcifar float32 likewise, so a float32
trajectory comparison measures rounding luck, not semantics. The float32 path is compared on one step
(same weights in, same loss and weights out), once with XLA's convolution gradients and once with
``CustomGradConv``'s (matmul weight gradients, polyphase input gradients) on every convolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.torch_support import require

pytestmark = pytest.mark.torch
torch = require("torch")

from jaxcifar import gradcam, interop, models, optim, steps, transforms  # noqa: E402
from jaxcifar.config import Config  # noqa: E402
from jaxcifar.models.conv import CustomGradConv  # noqa: E402
from jaxcifar.models.resnet import BN_MOMENTUM  # noqa: E402
from jaxcifar.sources import make_synthetic  # noqa: E402
from jaxcifar.state import TrainState  # noqa: E402
from jaxcifar.torch_resnet import make_resnet  # noqa: E402

torch.set_num_threads(1)  # these small convolutions run ~20x slower on 2 threads on this 2-core machine

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
BATCH = 8


def _images(n: int, seed: int) -> torch.Tensor:
    """Random N(0, 1) float32 images (n, 3, 32, 32)."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|."""
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def _bn_count(key: str, batch: int) -> int:
    """Values per channel a BatchNorm sees in a batch: B * h * w (h = 32 / 2**(stage - 1), stem 32)."""
    stage = int(key[5]) if key.startswith("layer") else 1
    side = 32 // 2 ** (stage - 1)
    return batch * side * side


def _torch_running_var(ours_new: np.ndarray, old: np.ndarray, count: int, steps_taken: int = 1) -> np.ndarray:
    """PyTorch's running_var, given jaxcifar's after the same updates from ``old``.

    Both keep ``v = m * v + (1 - m) * s_t`` with m = 0.9; PyTorch's ``s_t`` is the unbiased batch variance,
    ``n / (n - 1)`` times jaxcifar's biased one. So the difference is exactly the accumulated
    ``(1 - m) * sum m^(T-t) s_t`` (= ``ours_new - m^T * old``) times ``1 / (n - 1)``.
    """
    return ours_new + (ours_new - BN_MOMENTUM**steps_taken * old) / (count - 1)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_logits_match_pytorch_eval_and_train_mode(name: str) -> None:
    net = make_resnet(name, width=64, seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    variables = interop.load_torch_state_dict(net.state_dict(), name)
    model = models.get_model(name)
    x = _images(BATCH, seed=2)

    eval_logits = jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, _nhwc(x))
    train_logits, updates = jax.jit(lambda v, im: model.apply(v, im, train=True, mutable=["batch_stats"]))(
        variables, _nhwc(x)
    )
    with torch.no_grad():
        ref_eval = net.eval()(x).numpy()
        ref_train = net.train()(x).numpy()  # batch statistics; updates the running statistics

    assert np.abs(ref_eval).max() > 0.1 and np.abs(ref_train).max() > 0.1  # a real logit scale
    assert _rel(eval_logits, ref_eval) <= 1e-4
    assert _rel(train_logits, ref_train) <= 1e-4
    assert not np.allclose(ref_eval, ref_train, atol=1e-3)  # the two modes really differ

    # Running statistics after the train-mode forward: means equal; variances equal once PyTorch's
    # unbiased update is accounted for (the one inherent difference).
    ours = interop.to_torch_state_dict({"params": variables["params"], "batch_stats": updates["batch_stats"]})
    ref = net.state_dict()
    for key in ref:
        if key.endswith("running_mean"):
            assert _rel(ours[key], ref[key]) <= 1e-4, key
        elif key.endswith("running_var"):
            count = _bn_count(key, BATCH)
            expected = _torch_running_var(ours[key].numpy(), before[key].numpy(), count)
            assert _rel(expected, ref[key]) <= 1e-5, key
            # without the correction they differ by 0.1 * s / (n - 1): ~1e-4 relative at layer4 here
            assert _rel(ours[key], ref[key]) <= 2 / (count - 1), key


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_state_dict_round_trip_is_exact(name: str) -> None:
    net = make_resnet(name, width=8, seed=3)
    ref = net.state_dict()
    variables = interop.load_torch_state_dict(ref, name)
    back = interop.to_torch_state_dict(variables, num_batches_tracked=7)

    assert list(back) == list(ref)  # same keys, same order
    for key, value in ref.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key
    fresh = make_resnet(name, width=8, seed=4)
    fresh.load_state_dict(back, strict=True)
    # and jax -> torch -> jax
    again = interop.load_torch_state_dict(back, name)
    jax.tree.map(np.testing.assert_array_equal, again, variables)
    # a TrainState converts like its variables
    state = TrainState.create(
        apply_fn=models.get_model(name, width=8).apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(0.1),
        rng=jax.random.PRNGKey(0),
    )
    from_state = interop.to_torch_state_dict(state, num_batches_tracked=7)
    assert list(from_state) == list(back) and all(torch.equal(from_state[k], v) for k, v in back.items())


def test_load_torch_checkpoint_file_with_wrapper_and_dataparallel_prefix(tmp_path) -> None:
    net = make_resnet("resnet34", width=8, seed=5)
    wrapped = {"net": {f"module.{k}": v for k, v in net.state_dict().items()}, "acc": 93.5, "epoch": 180}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    variables, meta = interop.load_torch_checkpoint(path)
    assert meta == {"acc": 93.5, "epoch": 180, "model": "resnet34", "width": 8, "num_classes": 10}
    back = interop.to_torch_state_dict(variables, num_batches_tracked=7)
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


@pytest.fixture(scope="module")
def resnet18_pair():
    """(torch ResNet18 width 64, its jaxcifar variables, the Linen model, 8 random images (torch NCHW))."""
    net = make_resnet("resnet18", width=64, seed=6)
    return net, interop.load_torch_state_dict(net.state_dict(), "resnet18"), models.get_model("resnet18"), _images(8, 7)


@pytest.mark.parametrize("layer", ["layer3", "layer2"])
@pytest.mark.parametrize("explicit", [False, True], ids=["argmax", "targets"])
def test_grad_cam_matches_pytorch_grad_cam(resnet18_pair, layer: str, explicit: bool) -> None:
    require("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net, variables, model, x = resnet18_pair
    targets = [3, 1, 4, 1, 5, 9, 2, 6] if explicit else None

    def reference(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
        with GradCAM(model=net, target_layers=[getattr(net, layer)]) as cam:
            wrapped = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
            return cam(input_tensor=x, targets=wrapped)

    ref = reference(net, x)
    ours = np.asarray(gradcam.grad_cam(model, variables, _nhwc(x), layer, targets=targets))
    assert ref.shape == ours.shape == (8, 32, 32)
    assert ref.max() > 0.99  # real maps, not all zeros
    # A ReLU input within float32 rounding of zero in the layers after `layer` can flip between the two
    # libraries and move that image's gradient by ~1 % (seen 2026-11-26 with torch 2.14.1 and numpy 2.4, on
    # old and new code alike: image 4 of 8, gradient 3.3e-5 off for activations within 8e-7, its map 1.1e-3
    # off; the other maps within 5e-6). So: every map within 1e-2, all but at most one within 1e-4.
    per_image = np.abs(ours - ref).reshape(len(ref), -1).max(axis=1)
    assert np.sum(per_image <= 1e-4) >= len(per_image) - 1 and per_image.max() <= 1e-2, per_image


def _pytorch_training(net, images: np.ndarray, labels: np.ndarray, lr: float, dtype, onecycle: bool) -> list[float]:
    """PyTorch SGD(momentum 0.9, no nesterov, weight_decay 5e-4), with OneCycleLR(cycle_momentum=False)
    over the batches when ``onecycle``, else a constant LR; one step per batch of (steps, B, 32, 32, 3)
    uint8 images. Each batch is normalized in torch as torchvision's ``ToTensor`` + ``Normalize`` do (float32
    x / 255, then (x - mean) / std per channel), and jaxcifar's ``normalize`` must give the same within float32
    rounding (max 2 ulps, 4.8e-7, seen). The network then gets jaxcifar's bits: XLA:CPU's x / 255 is not
    correctly rounded (42 % of the pixels differ from torch's and numpy's in the last bit), and such input
    differences flip ReLUs (see above): fed torch's values, the float64 losses moved by up to 6 % within the 10
    steps. Returns the per-step losses."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=False, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=len(images), pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
        anneal_strategy="cos", cycle_momentum=False,
    ) if onecycle else None  # fmt: skip
    net.train()
    losses = []
    for batch, target in zip(images, labels, strict=True):
        x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255) - mean) / std  # ToTensor, Normalize
        ours = np.asarray(transforms.normalize(jnp.asarray(batch), MEAN, STD)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(ours, x.numpy(), rtol=0, atol=1e-6, err_msg="normalize differs from torch's")
        logits = net(torch.from_numpy(ours.copy()).to(dtype))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(target).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _jaxcifar_training(
    variables: dict,
    images: np.ndarray,
    labels: np.ndarray,
    lr: float,
    dtype,
    width: int,
    onecycle: bool,
    conv_general_dilated=jax.lax.conv_general_dilated,
) -> tuple[list[float], TrainState]:
    """``steps.train_step`` (augment none) with ``optim``'s SGD (momentum 0.9, no nesterov, weight decay
    5e-4) and the onecycle (else constant) schedule over the batches, the model's convolutions running
    ``conv_general_dilated`` (default XLA's: ``CustomGradConv`` accumulates its weight gradient in float32,
    so not for float64). Returns (losses, final state)."""
    config = Config(
        optimizer="sgd", lr=lr, momentum=0.9, nesterov=False, weight_decay=5e-4,
        schedule="onecycle" if onecycle else "constant", pct_start=0.3, div_factor=25.0,
        final_div_factor=1e4, epochs=1, batch_size=images.shape[1], augment="none",
    )  # fmt: skip
    tx = optim.make_optimizer(config, optim.make_schedule(config, steps_per_epoch=len(images)))
    model = models.get_model("resnet18", width=width, dtype=dtype, conv_general_dilated=conv_general_dilated)
    logits = jax.eval_shape(
        lambda v, im: model.apply(v, im, train=False), variables, jax.ShapeDtypeStruct((1, 32, 32, 3), dtype)
    )
    assert logits.dtype == dtype, "ResNet(dtype=float64) must keep float64 logits (and train_step a float64 loss)"
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)  # noqa: E731
    state = TrainState.create(
        apply_fn=model.apply,
        params=cast(variables["params"]),
        batch_stats=cast(variables["batch_stats"]),
        tx=tx,
        rng=jax.random.PRNGKey(0),
    )
    step = steps.make_train_step(MEAN, STD, augment="none")
    losses = []
    for batch, target in zip(images, labels, strict=True):
        state, metrics = step(state, {"image": jnp.asarray(batch), "label": jnp.asarray(target)})
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    return losses, state


def _synthetic_batches(steps_: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``steps_`` batches of the learnable synthetic problem: uint8 (steps, B, 32, 32, 3), int32 (steps, B)."""
    arrays, _ = make_synthetic(num_train=steps_ * batch, num_test=10, seed=0)
    images, labels = arrays["train"]
    return images.reshape(steps_, batch, 32, 32, 3), labels.astype(np.int32).reshape(steps_, batch)


def test_training_matches_pytorch_sgd_onecycle_float64() -> None:
    """10 steps from the same weights: same per-step losses and final weights, in float64 on both sides."""
    num_steps, width, lr = 10, 4, 0.4
    images, labels = _synthetic_batches(num_steps, BATCH)
    net = make_resnet("resnet18", width=width, seed=8)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    variables = interop.load_torch_state_dict(net.state_dict(), "resnet18")

    with jax.enable_x64(True):
        ours, state = _jaxcifar_training(variables, images, labels, lr, jnp.float64, width, onecycle=True)
        got = interop.to_torch_state_dict(state)
    ref = _pytorch_training(net.double(), images, labels, lr, torch.float64, onecycle=True)

    assert ref[-1] < ref[0]  # it learns something
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    final = net.state_dict()
    assert got["conv1.weight"].dtype == torch.float64
    for key, value in final.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            count = _bn_count(key, BATCH)
            expected = _torch_running_var(got[key].numpy(), start[key].double().numpy(), count, num_steps)
            assert _rel(expected, value.numpy()) <= 1e-4, key
        else:  # parameters and running means
            assert _rel(got[key].numpy(), value.numpy()) <= 1e-4, key


@pytest.fixture(scope="module")
def float32_step() -> tuple[dict, np.ndarray, np.ndarray, list[float], dict]:
    """One PyTorch float32 SGD step at LR 0.4, ResNet18 width 8, batch 16, computed once for both primitives:
    (state_dict before, images, labels, losses, state_dict after)."""
    images, labels = _synthetic_batches(1, 16)
    net = make_resnet("resnet18", width=8, seed=9)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    losses = _pytorch_training(net, images, labels, 0.4, torch.float32, onecycle=False)
    return start, images, labels, losses, net.state_dict()


@pytest.mark.parametrize(
    "conv_general_dilated", [jax.lax.conv_general_dilated, CustomGradConv()], ids=["lax", "custom-vjp"]
)
def test_one_float32_training_step_matches_pytorch(float32_step, conv_general_dilated) -> None:
    """The production float32 paths, both convolution primitives: XLA's (GPU, TPU, several devices) and
    ``CustomGradConv`` on every convolution (what "auto" runs on one CPU device for the large ones: matmul
    weight gradients in patch blocks, polyphase input gradients for the stride-2 ones). One SGD step at LR
    0.4 from the same weights gives the same loss and weights within 1e-4 (the schedule: float64 above)."""
    start, images, labels, ref, final = float32_step
    variables = interop.load_torch_state_dict({k: v.clone() for k, v in start.items()}, "resnet18")
    if isinstance(conv_general_dilated, CustomGradConv):  # all 20 convolutions take the custom VJP
        model = models.get_model("resnet18", width=8, conv_general_dilated=conv_general_dilated)
        jaxpr = jax.make_jaxpr(lambda v, im: model.apply(v, im, train=False))(variables, images[0].astype(np.float32))
        assert str(jaxpr).count("custom_vjp_call") == 20
    ours, state = _jaxcifar_training(
        variables, images, labels, 0.4, jnp.float32, 8, onecycle=False, conv_general_dilated=conv_general_dilated
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    got = interop.to_torch_state_dict(state)
    for key, value in final.items():
        if key.endswith(("weight", "bias", "running_mean")):
            assert _rel(got[key].numpy(), value.numpy()) <= 1e-4, key
    assert _rel(start["linear.weight"].numpy(), final["linear.weight"].numpy()) > 1e-2  # the step moved it
