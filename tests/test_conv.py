"""models.conv and jaxcifar.backend's convolution policy: ``CustomGradConv`` (the matmul weight gradient
and polyphase input gradient) equals XLA's convolution and its autodiff, and each platform gets the
primitive and XLA options it was measured to need."""

from __future__ import annotations

import re
from types import SimpleNamespace

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from jaxcifar import backend, models
from jaxcifar.config import Config
from jaxcifar.models import conv as mconv
from jaxcifar.models.conv import CustomGradConv
from jaxcifar.network import build_model

NHWC = ("NHWC", "HWIO", "NHWC")
CPU, GPU, TPU = (SimpleNamespace(platform=p) for p in ("cpu", "gpu", "tpu"))  # device-likes for backend


def _reference(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _inputs(shape, kernel_shape, seed=0, dtype=jnp.float32):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    kernel = (jax.random.normal(kw, kernel_shape, jnp.float32) / np.sqrt(np.prod(kernel_shape[:3]))).astype(dtype)
    return x, kernel, kg


def _custom_calls(fn, *args) -> int:
    """How many custom-VJP calls (convolutions that take ``models.conv``'s gradients) ``fn(*args)`` traces."""
    return str(jax.make_jaxpr(fn)(*args)).count("custom_vjp_call")


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


@pytest.mark.parametrize("block_bytes", [mconv.PATCH_BLOCK_BYTES, 1], ids=["one-block", "blocked"])
@pytest.mark.parametrize(("shape", "kernel_shape", "strides", "padding"), CASES)
def test_float32_gradients_equal_autodiff(shape, kernel_shape, strides, padding, block_bytes):
    """``CustomGradConv`` called as ``lax.conv_general_dilated`` takes the custom VJP, and its forward, input
    gradient (polyphase where strided and divisible) and weight gradient equal lax's within float32 rounding,
    whether the weight gradient is one matmul or a loop over batch blocks (``block_bytes=1``: one image each)."""
    conv_fn = CustomGradConv(block_bytes=block_bytes)
    x, kernel, key = _inputs(shape, kernel_shape)
    out = _reference(x, kernel, strides, padding)
    cotangent = jax.random.normal(key, out.shape)

    def loss(conv_fn, x, kernel):
        return jnp.sum(conv_fn(x, kernel, strides, padding, dimension_numbers=NHWC) * cotangent)

    want = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(lax.conv_general_dilated, x, kernel)
    got = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(conv_fn, x, kernel)
    assert _custom_calls(lambda x, k: loss(conv_fn, x, k), x, kernel) == 1
    chex.assert_trees_all_close(conv_fn(x, kernel, strides, padding, dimension_numbers=NHWC), out, rtol=0, atol=0)
    chex.assert_trees_all_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got[1], want[1], rtol=1e-5, atol=1e-4)
    chex.assert_type(got[1], jnp.float32)


@pytest.mark.parametrize(("shape", "kernel_shape", "strides", "padding"), [CASES[1], CASES[5]])
def test_weight_gradient_does_not_depend_on_the_block_size(shape, kernel_shape, strides, padding):
    """``block_bytes=None`` (one matmul over the batch, the sharded case) and small blocks (a ``scan`` over
    1 or 2 images at a time) give the same weight gradient, equal to autodiff's."""
    x, kernel, key = _inputs(shape, kernel_shape)
    g = jax.random.normal(key, _reference(x, kernel, strides, padding).shape)
    _, vjp = jax.vjp(lambda k: _reference(x, k, strides, padding), kernel)
    want = vjp(g)[0]
    per_image = int(np.prod(g.shape[1:3])) * int(np.prod(kernel_shape[:3])) * x.dtype.itemsize
    grads = {}
    for block_bytes in (None, 1, 2 * per_image):
        fn = jax.jit(lambda x, g, b=block_bytes: mconv.weight_grad(x, g, kernel_shape[:2], strides, padding, b))
        assert ("scan" in str(jax.make_jaxpr(fn)(x, g))) == (block_bytes is not None), block_bytes  # really blocked
        grads[block_bytes] = fn(x, g)
    chex.assert_trees_all_close(grads[1], grads[None], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads[2 * per_image], grads[None], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads[None], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("shape", "kernel_shape", "strides", "padding"), CASES[:4])
def test_bfloat16_gradients_match_float32_reference(shape, kernel_shape, strides, padding):
    """With bfloat16 inputs both primitives return bfloat16 gradients; both are within bfloat16
    rounding (2^-8 relative, a few roundings) of the float32 gradient of the same bf16 values."""
    x, kernel, key = _inputs(shape, kernel_shape, dtype=jnp.bfloat16)
    cotangent = jax.random.normal(key, _reference(x, kernel, strides, padding).shape).astype(jnp.bfloat16)

    def loss(conv_fn, x, kernel):
        out = conv_fn(x, kernel, strides, padding, dimension_numbers=NHWC)
        return jnp.sum((out * cotangent).astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    exact = grad(lax.conv_general_dilated, x.astype(jnp.float32), kernel.astype(jnp.float32))
    for conv_fn in (lax.conv_general_dilated, CustomGradConv()):
        for got, want in zip(grad(conv_fn, x, kernel), exact, strict=True):
            chex.assert_type(got, jnp.bfloat16)
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
        {"precision": lax.Precision.HIGHEST},
        {"preferred_element_type": jnp.float32},
    ],
    ids=["rhs-dilation", "lhs-dilation", "groups", "string-padding", "nchw", "precision", "element-type"],
)
def test_unsupported_configurations_fall_back_to_lax(kwargs):
    """What the custom VJP does not handle runs lax's convolution (no custom-VJP call), same values and gradients."""
    x, kernel, _ = _inputs((2, 6, 6, 4), (3, 3, 4, 4))
    if kwargs.get("feature_group_count"):
        kernel = kernel[:, :, :2]
    args = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)), "dimension_numbers": NHWC, **kwargs}
    if args["dimension_numbers"] != NHWC:
        x, kernel = x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1)
    conv_fn = CustomGradConv()
    assert _custom_calls(lambda x, k: conv_fn(x, k, **args), x, kernel) == 0
    want = lax.conv_general_dilated(x, kernel, **args)
    chex.assert_trees_all_close(conv_fn(x, kernel, **args), want)
    grads = jax.grad(lambda k: jnp.sum(conv_fn(x, k, **args) ** 2))(kernel)
    chex.assert_trees_all_close(grads, jax.grad(lambda k: jnp.sum(lax.conv_general_dilated(x, k, **args) ** 2))(kernel))


AUTO = CustomGradConv(min_flops=backend.AUTO_MIN_FLOPS, min_out_pixels=backend.AUTO_MIN_OUT_PIXELS)


@pytest.mark.parametrize(
    ("impl", "devices", "expected"),
    [
        ("auto", [CPU], AUTO),
        ("auto", [CPU, CPU], lax.conv_general_dilated),
        ("auto", [GPU], lax.conv_general_dilated),
        ("auto", [TPU], lax.conv_general_dilated),
        ("lax", [CPU], lax.conv_general_dilated),
        ("lax", [GPU, GPU], lax.conv_general_dilated),
        ("matmul", [CPU], CustomGradConv()),
        ("matmul", [GPU], CustomGradConv()),
        ("matmul", [CPU, CPU], CustomGradConv(block_bytes=None)),  # a sharded batch: no loop of collectives
        ("matmul", [GPU, GPU, GPU, GPU], CustomGradConv(block_bytes=None)),
    ],
    ids="auto-cpu auto-2cpu auto-gpu auto-tpu lax-cpu lax-2gpu matmul-cpu matmul-gpu matmul-2cpu matmul-4gpu".split(),
)
def test_backend_chooses_the_convolution_per_platform(impl, devices, expected):
    """``auto`` takes the custom gradients only on one CPU device, XLA's on GPU, TPU and several devices;
    ``lax`` and ``matmul`` are what they say, ``matmul`` over several devices with one weight-gradient matmul."""
    chosen = backend.conv_general_dilated(impl, devices)
    assert chosen == expected and type(chosen) is type(expected)
    words = {"lax": "lax", "matmul": "matmul", "auto": "auto: matmul" if chosen == AUTO else "auto: lax"}[impl]
    assert backend.describe_conv(impl, devices).startswith(words)
    # Config.conv_impl reaches the model through network.build_model
    assert build_model(Config(width=4, conv_impl=impl), devices).conv_general_dilated == expected


@pytest.mark.parametrize("model", ["airbench", "resnet9"])
def test_auto_keeps_xla_gradients_for_the_fast_models(model):
    """On one CPU device "auto" gives airbench and resnet9 XLA's own gradients everywhere (their batch-512 train
    step measured faster so) and ResNet18 the per-shape custom gradients; "matmul" still forces the custom VJP."""
    assert backend.conv_general_dilated("auto", [CPU], model) is lax.conv_general_dilated
    assert backend.describe_conv("auto", [CPU], model) == "auto: lax"
    assert build_model(Config(model=model, width=4), [CPU]).conv_general_dilated is lax.conv_general_dilated
    assert build_model(Config(model=model, width=4, conv_impl="matmul"), [CPU]).conv_general_dilated == CustomGradConv()
    assert build_model(Config(model="resnet18", width=4), [CPU]).conv_general_dilated == AUTO
    assert [models.cpu_auto_conv(name) for name in (model, "resnet18", "ResNet34")] == ["lax", "per-shape", "per-shape"]
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        backend.conv_general_dilated("auto", [CPU], "resnet50")


def test_backend_defaults_to_this_process_devices_and_rejects_unknown_impls():
    assert backend.conv_general_dilated() == backend.conv_general_dilated("auto", jax.devices())
    with pytest.raises(ValueError, match=r"'cudnn'.*auto, lax, matmul"):
        backend.conv_general_dilated("cudnn", [CPU])
    with pytest.raises(ValueError, match="auto, lax, matmul"):
        backend.describe_conv("matmult")


def _conv_sites(conv_fn, x_shape, kernel_shape, strides=(1, 1)) -> int:
    pad = kernel_shape[0] // 2
    return _custom_calls(
        lambda x, k: conv_fn(x, k, strides, ((pad, pad), (pad, pad)), dimension_numbers=NHWC),
        jax.ShapeDtypeStruct(x_shape, jnp.float32),
        jax.ShapeDtypeStruct(kernel_shape, jnp.float32),
    )


def test_auto_uses_the_custom_gradients_only_where_they_pay():
    """On one CPU device, "auto" keeps XLA's gradients for small convolutions (as fast, quicker to
    compile) and for large 3x3 stride-1 ones at 8x8 and below (XLA's as fast or faster there), and
    uses the custom VJP for 1x1 and large strided or larger-than-8x8 3x3 convolutions."""
    auto = backend.conv_general_dilated("auto", [CPU])
    small, large = ((8, 8, 8, 16), (3, 3, 16, 16)), ((128, 16, 16, 128), (3, 3, 128, 128))
    assert 2 * 8 * 64 * 9 * 16 * 16 < backend.AUTO_MIN_FLOPS <= 2 * 128 * 256 * 9 * 128 * 128
    assert not _conv_sites(auto, *small)
    assert _conv_sites(auto, *large)
    assert _conv_sites(auto, (128, 32, 32, 64), (3, 3, 64, 128), (2, 2))
    assert not _conv_sites(auto, (8, 8, 8, 16), (3, 3, 16, 32), (2, 2))
    assert _conv_sites(auto, (128, 32, 32, 64), (3, 3, 64, 64))
    assert not _conv_sites(auto, (128, 8, 8, 256), (3, 3, 256, 256))
    assert not _conv_sites(auto, (128, 4, 4, 512), (3, 3, 512, 512))
    assert _conv_sites(auto, (8, 8, 8, 16), (1, 1, 16, 32), (2, 2))
    assert _conv_sites(backend.conv_general_dilated("matmul", [CPU]), *small)  # "matmul": every convolution
    assert not _conv_sites(backend.conv_general_dilated("lax", [CPU]), *large)


@pytest.fixture(scope="module")
def tiny_models():
    """ResNet18 width 4 with each primitive, and variables initialized by the lax one."""
    from jaxcifar.state import init_variables

    built = {
        "lax": models.get_model("resnet18", width=4),
        "custom": models.get_model("resnet18", width=4, conv_general_dilated=CustomGradConv()),
    }
    return built, init_variables(built["lax"], jax.random.PRNGKey(0))


def test_parameters_do_not_depend_on_the_primitive(tiny_models):
    """Same names, shapes and initial values: checkpoints and the PyTorch mapping are unaffected. Models
    built with equal primitives compare (and hash) equal, so jit caches keyed on them still hit."""
    from jaxcifar.state import init_variables

    built, variables = tiny_models
    assert built["lax"].conv_general_dilated is lax.conv_general_dilated  # the model's default
    chex.assert_trees_all_equal(init_variables(built["custom"], jax.random.PRNGKey(0)), variables)
    params = variables["params"]
    assert params["layer2_0"]["shortcut_conv"]["kernel"].shape == (1, 1, 4, 8)
    assert set(params["layer1_0"]["conv1"]) == {"kernel"}  # no bias
    twin = models.get_model("resnet18", width=4, conv_general_dilated=CustomGradConv())
    assert twin == built["custom"] and hash(twin) == hash(built["custom"]) and twin != built["lax"]


def test_whole_model_loss_and_gradients_match(tiny_models):
    """Train-mode loss, parameter gradients and BatchNorm updates of the whole ResNet18 agree, with the
    custom VJP on all 20 of its convolutions (stem, 16 in blocks, 3 shortcuts) and on none with lax."""
    built, variables = tiny_models
    images = jax.random.normal(jax.random.PRNGKey(1), (6, 32, 32, 3))
    labels = jnp.arange(6) % 10

    def loss_fn(model, params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    results, sites = {}, {}
    for name, model in built.items():
        sites[name] = _custom_calls(lambda p, m=model: loss_fn(m, p), variables["params"])
        results[name] = jax.jit(jax.value_and_grad(lambda p, m=model: loss_fn(m, p), has_aux=True))(variables["params"])
    assert sites == {"lax": 0, "custom": 20}
    (loss_lax, stats_lax), grads_lax = results["lax"]
    (loss_mm, stats_mm), grads_mm = results["custom"]
    chex.assert_trees_all_close(loss_mm, loss_lax, rtol=1e-6)
    chex.assert_trees_all_close(stats_mm, stats_lax, rtol=1e-5, atol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_lax))
    chex.assert_trees_all_close(grads_mm, grads_lax, rtol=1e-4, atol=1e-5 * scale)


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


def test_compiler_options_are_for_cpu_only_and_reject_unknown_choices():
    assert backend.compiler_options(platform="gpu") == backend.compiler_options("ynnpack", platform="gpu") == {}
    assert backend.compiler_options(platform="tpu") == {}
    assert backend.compiler_options("ynnpack", platform="cpu") == {}  # XLA's default, for comparison
    assert backend.compiler_options(platform="cpu")  # eigen: not XLA's default
    with pytest.raises(ValueError, match="eigen, ynnpack"):
        backend.compiler_options("mkl", platform="cpu")


def _ynn_placement(text: str) -> dict[str, set[bool]]:
    """For the convolution and dot instructions of the compiled HLO ``text``: {op: {whether it runs inside a
    YNNPACK fusion (a computation called by a ``__ynn_fusion``), for each instruction}}."""
    bodies = {}  # computation name -> its instructions
    for block in re.split(r"\n\s*\n", text):
        header = re.match(r"\s*(?:ENTRY\s+)?%([\w.\-]+)\s*\(", block)
        if header:
            bodies[header.group(1)] = block
    ynn = set(re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", text))  # computations YNNPACK runs
    placement = {"convolution": set(), "dot": set()}
    for name, body in bodies.items():
        for op in placement:
            if re.search(rf"= \S+ {op}\(", body):
                placement[op].add(name in ynn)
    return placement


def test_compiler_options_give_cpu_convolutions_to_eigen():
    """Positive control: XLA's default compile ("ynnpack", ``{}``) runs a 64-channel convolution inside a
    YNNPACK fusion; ``compiler_options()`` (eigen) runs it as XLA's own convolution op (Eigen kernels) and
    still gives the dot to YNNPACK. Fails if the option stops having that effect (a new jaxlib renaming or
    dropping it, or YNNPACK no longer taking convolutions: then re-measure experiments/cpu_conv)."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU compiler options; compiler_options() is {} on this backend")
    x, kernel, _ = _inputs((2, 8, 8, 64), (3, 3, 64, 64))
    w = jnp.ones((64, 64))

    def fn(x, k, w):
        return _reference(x, k, (1, 1), ((1, 1), (1, 1))), x.reshape(-1, 64) @ w

    def placement(options):
        return _ynn_placement(jax.jit(fn, compiler_options=options).lower(x, kernel, w).compile().as_text())

    assert placement(backend.compiler_options("ynnpack")) == {"convolution": {True}, "dot": {True}}
    assert placement(backend.compiler_options()) == {"convolution": {False}, "dot": {True}}


STRIDE1_CASES = [
    # (input shape, kernel shape, padding): airbench's and resnet9's 3x3 "same" convolutions, airbench's
    # 2x2 whitening (VALID), an asymmetric padding.
    ((3, 7, 7, 4), (3, 3, 4, 6), ((1, 1), (1, 1))),
    ((2, 8, 8, 3), (2, 2, 3, 5), ((0, 0), (0, 0))),
    ((2, 6, 9, 3), (3, 2, 3, 4), ((2, 0), (0, 1))),
]


@pytest.mark.parametrize("block_bytes", [None, 1], ids=["one-matmul", "blocked"])
@pytest.mark.parametrize(("shape", "kernel_shape", "padding"), STRIDE1_CASES)
def test_matmul_forward_and_input_gradient_equal_lax(shape, kernel_shape, padding, block_bytes):
    """``matmul_conv`` (im2col matmuls) equals the stride-1 lax convolution, and ``matmul_input_grad`` its input
    gradient (the convolution of the padded ``g`` with the flipped kernel), in one matmul or one image at a time."""
    x, kernel, key = _inputs(shape, kernel_shape)
    out, vjp = jax.vjp(lambda x_: _reference(x_, kernel, (1, 1), padding), x)
    g = jax.random.normal(key, out.shape)
    got = jax.jit(mconv.matmul_conv, static_argnums=(2, 3))(x, kernel, padding, block_bytes)
    chex.assert_trees_all_close(got, out, rtol=1e-5, atol=1e-5)
    dx = jax.jit(mconv.matmul_input_grad, static_argnums=(2, 3, 4))(kernel, g, shape, padding, block_bytes)
    chex.assert_shape(dx, shape)
    chex.assert_trees_all_close(dx, vjp(g)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize(("shape", "size"), [((2, 31, 31, 3), 2), ((2, 7, 7, 3), 3), ((1, 8, 6, 2), 2)])
def test_max_pool_equals_flax_max_pool_and_its_gradient(shape, size, ties):
    """``max_pool`` returns flax's ``max_pool`` (stride = window, VALID: odd sides drop their last rows) and the
    same gradient, jitted or not: each window's cotangent goes to one element, also where a window holds several
    equal maxima (``ties``: values from {0, 1, 2}), the first of them, as flax's select-and-scatter."""
    x = jax.random.normal(jax.random.PRNGKey(3), shape)
    if ties:
        x = jnp.floor(jax.random.uniform(jax.random.PRNGKey(5), shape) * 3)
    want, want_vjp = jax.vjp(lambda x_: nn.max_pool(x_, (size, size), strides=(size, size)), x)
    g = jax.random.normal(jax.random.PRNGKey(4), want.shape)
    for pool in (mconv.max_pool, jax.jit(mconv.max_pool, static_argnums=1)):
        got, got_vjp = jax.vjp(lambda x_, pool=pool: pool(x_, size), x)
        chex.assert_trees_all_equal(got, want)
        dx = got_vjp(g)[0]
        chex.assert_shape(dx, shape)
        chex.assert_trees_all_equal(dx, want_vjp(g)[0])
    # every window's cotangent lands on one element: a window with tied maxima gets no split
    b, ho, wo, c = want.shape
    windows = (slice(None), slice(0, ho * size), slice(0, wo * size))
    hits = (dx[windows] != 0).reshape(b, ho, size, wo, size, c).sum(axis=(2, 4))
    assert bool(jnp.all(hits == 1)), hits
    maxima = x[windows].reshape(b, ho, size, wo, size, c) == want[:, :, None, :, None, :]
    assert (int(maxima.sum()) > want.size) == ties  # the tied inputs do hold windows with several maxima
