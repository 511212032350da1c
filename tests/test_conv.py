"""models.conv: the matmul weight-gradient convolution equals XLA's convolution and its autodiff."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from jaxcifar import models
from jaxcifar.models import conv as mconv

NHWC = ("NHWC", "HWIO", "NHWC")


def _reference(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _inputs(shape, kernel_shape, out_channels_seed=0, dtype=jnp.float32):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(out_channels_seed), 3)
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    kernel = (jax.random.normal(kw, kernel_shape, jnp.float32) / np.sqrt(np.prod(kernel_shape[:3]))).astype(dtype)
    return x, kernel, kg


CASES = [
    # (input shape, kernel shape, strides, padding): the ResNet's convs and a few odd ones.
    ((4, 8, 8, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
    ((4, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
    ((4, 7, 7, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
    ((4, 8, 8, 4), (1, 1, 4, 6), (2, 2), ((0, 0), (0, 0))),
    ((3, 9, 9, 3), (1, 1, 3, 5), (1, 1), ((0, 0), (0, 0))),
    ((3, 9, 10, 3), (3, 3, 3, 5), (3, 2), ((2, 0), (1, 2))),
    # Polyphase input gradient: a kernel wider than twice the stride, a stride larger than the kernel.
    ((2, 12, 12, 3), (5, 5, 3, 4), (3, 3), ((2, 2), (2, 2))),
    ((2, 12, 8, 3), (3, 2, 3, 4), (2, 4), ((0, 1), (1, 0))),
]


@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "blocked"])
@pytest.mark.parametrize(("shape", "kernel_shape", "strides", "padding"), CASES)
def test_float32_gradients_equal_autodiff(shape, kernel_shape, strides, padding, blocked, monkeypatch):
    """Forward, input gradient (polyphase where strided and divisible) and weight gradient equal lax's
    within float32 rounding, whether the weight gradient is one matmul or a loop over batch blocks
    (forced by a tiny block size)."""
    if blocked:
        monkeypatch.setattr(mconv, "PATCH_BLOCK_BYTES", 1)  # one image per block
    x, kernel, key = _inputs(shape, kernel_shape)
    out = _reference(x, kernel, strides, padding)
    cotangent = jax.random.normal(key, out.shape)

    def loss(conv_fn, x, kernel):
        return jnp.sum(conv_fn(x, kernel, strides, padding) * cotangent)

    want = jax.grad(loss, argnums=(1, 2))(_reference, x, kernel)
    got = jax.grad(loss, argnums=(1, 2))(mconv.conv, x, kernel)
    chex.assert_trees_all_close(mconv.conv(x, kernel, strides, padding), out, rtol=0, atol=0)
    chex.assert_trees_all_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got[1], want[1], rtol=1e-5, atol=1e-4)
    assert got[1].dtype == jnp.float32


@pytest.mark.parametrize(("shape", "kernel_shape", "strides", "padding"), CASES[:4])
def test_bfloat16_gradients_match_float32_reference(shape, kernel_shape, strides, padding):
    """With bfloat16 inputs both implementations return bfloat16 gradients; both are within bfloat16
    rounding (2^-8 relative, a few roundings) of the float32 gradient of the same bf16 values."""
    x, kernel, key = _inputs(shape, kernel_shape, dtype=jnp.bfloat16)
    cotangent = jax.random.normal(key, _reference(x, kernel, strides, padding).shape).astype(jnp.bfloat16)

    def loss(conv_fn, x, kernel):
        return jnp.sum((conv_fn(x, kernel, strides, padding) * cotangent).astype(jnp.float32))

    exact = jax.grad(loss, argnums=(1, 2))(_reference, x.astype(jnp.float32), kernel.astype(jnp.float32))
    for conv_fn in (_reference, mconv.conv):
        grads = jax.grad(loss, argnums=(1, 2))(conv_fn, x, kernel)
        for got, want in zip(grads, exact, strict=True):
            assert got.dtype == jnp.bfloat16
            scale = float(jnp.abs(want).max())
            assert float(jnp.abs(got.astype(jnp.float32) - want).max()) <= 2e-2 * scale


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rhs_dilation": (2, 2)},
        {"lhs_dilation": (2, 2)},
        {"feature_group_count": 2},
        {"padding": "SAME"},
        {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
    ],
    ids=["rhs-dilation", "lhs-dilation", "groups", "string-padding", "nchw"],
)
def test_unsupported_configurations_fall_back_to_lax(kwargs):
    x, kernel, _ = _inputs((2, 6, 6, 4), (3, 3, 4, 4))
    if kwargs.get("feature_group_count"):
        kernel = kernel[:, :, :2]
    args = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)), "dimension_numbers": NHWC, **kwargs}
    if args["dimension_numbers"] != NHWC:
        x, kernel = x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1)
    conv_fn = mconv.make_conv_general_dilated("matmul")
    want = lax.conv_general_dilated(x, kernel, **args)
    chex.assert_trees_all_close(conv_fn(x, kernel, **args), want)
    grads = jax.grad(lambda k: jnp.sum(conv_fn(x, k, **args) ** 2))(kernel)
    chex.assert_trees_all_close(grads, jax.grad(lambda k: jnp.sum(lax.conv_general_dilated(x, k, **args) ** 2))(kernel))


def test_resolve_impl_follows_backend_and_environment(monkeypatch):
    monkeypatch.delenv(mconv.ENV_VAR, raising=False)
    expected = "matmul" if jax.default_backend() == "cpu" and jax.device_count() == 1 else "lax"
    assert mconv.resolve_impl("auto") == expected
    assert mconv.resolve_impl("lax") == "lax"
    assert mconv.resolve_impl("matmul") == "matmul"
    monkeypatch.setenv(mconv.ENV_VAR, "lax")
    assert mconv.resolve_impl("auto") == "lax"
    assert mconv.resolve_impl("matmul") == "matmul"  # an explicit choice wins over the environment
    monkeypatch.setenv(mconv.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="JAXCIFAR_CONV_IMPL"):
        mconv.resolve_impl("auto")
    with pytest.raises(ValueError, match="auto, lax, matmul"):
        mconv.resolve_impl("cudnn")


@pytest.fixture(scope="module")
def tiny_models():
    """ResNet18 width 4 built with each implementation, and variables initialized by the lax one."""
    from jaxcifar.state import init_variables

    built = {impl: models.get_model("resnet18", width=4, conv_impl=impl) for impl in ("lax", "matmul")}
    return built, init_variables(built["lax"], jax.random.PRNGKey(0))


def test_parameters_do_not_depend_on_the_implementation(tiny_models):
    """Same names, shapes and initial values: checkpoints and the PyTorch mapping are unaffected."""
    from jaxcifar.state import init_variables

    built, variables = tiny_models
    chex.assert_trees_all_equal(init_variables(built["matmul"], jax.random.PRNGKey(0)), variables)
    params = variables["params"]
    assert params["layer2_0"]["shortcut_conv"]["kernel"].shape == (1, 1, 4, 8)
    assert set(params["layer1_0"]["conv1"]) == {"kernel"}  # no bias


def test_whole_model_loss_and_gradients_match(tiny_models):
    """Train-mode loss, parameter gradients and BatchNorm updates of the whole ResNet18 agree."""
    built, variables = tiny_models
    images = jax.random.normal(jax.random.PRNGKey(1), (6, 32, 32, 3))
    labels = jnp.arange(6) % 10

    def loss_fn(model, params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    results = {
        impl: jax.jit(jax.value_and_grad(lambda p, m=model: loss_fn(m, p), has_aux=True))(variables["params"])
        for impl, model in built.items()
    }
    (loss_lax, stats_lax), grads_lax = results["lax"]
    (loss_mm, stats_mm), grads_mm = results["matmul"]
    chex.assert_trees_all_close(loss_mm, loss_lax, rtol=1e-6)
    chex.assert_trees_all_close(stats_mm, stats_lax, rtol=1e-5, atol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_lax))
    chex.assert_trees_all_close(grads_mm, grads_lax, rtol=1e-4, atol=1e-5 * scale)


def _uses_matmul(conv_fn, x_shape, kernel_shape, strides=(1, 1)):
    x, kernel = jnp.zeros(x_shape), jnp.zeros(kernel_shape)
    pad = kernel_shape[0] // 2
    jaxpr = jax.make_jaxpr(lambda x, k: conv_fn(x, k, strides, ((pad, pad), (pad, pad)), dimension_numbers=NHWC))
    return "custom_vjp" in str(jaxpr(x, kernel))


def test_polyphase_input_gradient_is_used_where_the_sides_divide():
    """``input_grad`` splits strided convolutions whose input sides divide by the stride and leaves
    the rest (stride 1, 7x7 at stride 2) to XLA; both equal autodiff (also in the cases above)."""
    assert mconv._polyphase_applies((4, 8, 8, 4), (2, 2))
    assert not mconv._polyphase_applies((4, 7, 7, 4), (2, 2))
    assert not mconv._polyphase_applies((4, 8, 8, 4), (1, 1))
    for shape, strides in (((4, 8, 8, 4), (2, 2)), ((4, 7, 7, 4), (2, 2))):
        x, kernel, key = _inputs(shape, (3, 3, 4, 6))
        out, vjp = jax.vjp(lambda x_, k=kernel, s=strides: _reference(x_, k, s, ((1, 1), (1, 1))), x)
        g = jax.random.normal(key, out.shape)
        got = mconv.input_grad(kernel, g, x.shape, strides, ((1, 1), (1, 1)))
        chex.assert_trees_all_close(got, vjp(g)[0], rtol=1e-5, atol=1e-5)


def test_compiler_options_give_cpu_convolutions_to_eigen(monkeypatch):
    """On CPU the options keep XLA's convolution op (Eigen kernels) instead of a YNNPACK fusion;
    ``$JAXCIFAR_XLA_CPU_CONV=ynnpack`` restores XLA's defaults; an unknown value is an error.
    Fails if a new jaxlib renames or drops the option (then the speed-up is gone: re-measure)."""
    monkeypatch.delenv(mconv.XLA_CPU_CONV_ENV_VAR, raising=False)
    if jax.default_backend() != "cpu":
        assert mconv.compiler_options() == {}
        return
    x, kernel, _ = _inputs((2, 8, 8, 64), (3, 3, 64, 64))

    def compiled_text(options):
        fn = jax.jit(lambda x, k: _reference(x, k, (1, 1), ((1, 1), (1, 1))), compiler_options=options)
        return fn.lower(x, kernel).compile().as_text()

    options = mconv.compiler_options()
    assert options
    text = compiled_text(options)
    assert " convolution(" in text and "__ynn_fusion" not in text
    monkeypatch.setenv(mconv.XLA_CPU_CONV_ENV_VAR, "ynnpack")
    assert mconv.compiler_options() == {}
    monkeypatch.setenv(mconv.XLA_CPU_CONV_ENV_VAR, "mkl")
    with pytest.raises(ValueError, match="JAXCIFAR_XLA_CPU_CONV"):
        mconv.compiler_options()


def test_auto_uses_the_custom_gradients_only_where_they_pay(monkeypatch):
    """On one CPU device, "auto" keeps XLA's gradients for small convolutions (as fast, quicker to
    compile) and for large 3x3 stride-1 ones at 8x8 and below (XLA's as fast or faster there), and
    uses the custom VJP for 1x1 and large strided or larger-than-8x8 3x3 convolutions."""
    monkeypatch.delenv(mconv.ENV_VAR, raising=False)
    if mconv.resolve_impl("auto") != "matmul":
        pytest.skip("auto is lax on this backend")
    auto, forced = mconv.make_conv_general_dilated("auto"), mconv.make_conv_general_dilated("matmul")
    small, large = ((8, 8, 8, 16), (3, 3, 16, 16)), ((128, 16, 16, 128), (3, 3, 128, 128))
    assert 2 * 8 * 64 * 9 * 16 * 16 < mconv.AUTO_MIN_FLOPS <= 2 * 128 * 256 * 9 * 128 * 128
    assert not _uses_matmul(auto, *small)
    assert _uses_matmul(auto, *large)
    assert _uses_matmul(auto, (128, 32, 32, 64), (3, 3, 64, 128), (2, 2))
    assert not _uses_matmul(auto, (8, 8, 8, 16), (3, 3, 16, 32), (2, 2))
    assert _uses_matmul(auto, (128, 32, 32, 64), (3, 3, 64, 64))
    assert not _uses_matmul(auto, (128, 8, 8, 256), (3, 3, 256, 256))
    assert not _uses_matmul(auto, (128, 4, 4, 512), (3, 3, 512, 512))
    assert _uses_matmul(auto, (8, 8, 8, 16), (1, 1, 16, 32), (2, 2))
    assert _uses_matmul(forced, *small)
    assert not _uses_matmul(mconv.make_conv_general_dilated("lax"), *large)
    monkeypatch.setenv(mconv.ENV_VAR, "matmul")  # the environment forces it everywhere
    assert _uses_matmul(auto, *small)
