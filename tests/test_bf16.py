"""Mixed precision (``--dtype bfloat16``): bf16 compute, float32 params, optimizer state, BN statistics,
logits and loss; a short run learns as the float32 run does.

Tolerances, in units of bfloat16's unit roundoff U = 2**-8 (8 significand bits). Two runs of 30 SGD steps on
the synthetic problem (ResNet18 width 8, batch 16) both fall from 2.44 to a few hundredths, but along
different, chaotic trajectories (losses up to ~0.25 apart mid-run): comparing them shows learning, not
agreement. Agreement is measured from the same weights instead: at each of the float32 run's 30 steps, the
bf16 model's training loss on the same weights and batch is within 5 U (2 %) of the float32 loss (seen:
<= 2.45 U, the largest at the last steps' losses of 0.02..0.05; 0.12 U at the first step, which must stay
within 1 U). The loss itself is float32 arithmetic on the float32 logits: equal to the cross-entropy of the
bf16 model's logits recomputed in float64 within 1e-5 (seen <= 1.2e-6; a loss computed in bfloat16 is 6e-3
to 9e-3 off at these losses).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcifar import models, optim, steps
from jaxcifar.config import Config
from jaxcifar.data import NORMALIZATION
from jaxcifar.models.resnet import BN_EPSILON, BN_MOMENTUM
from jaxcifar.sources import make_synthetic
from jaxcifar.state import create_train_state

STEPS, BATCH, WIDTH = 30, 16, 8
LAST = 5
U = 2.0**-8  # bfloat16's unit roundoff (8 significand bits)


def _float_dtypes(tree) -> set:
    return {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.fixture(scope="module")
def runs():
    """The same 30 steps (same init, batches, flips) in float32 and in bfloat16:
    ``{dtype name: (final TrainState, per-step losses)}``, and under ``"shadow"`` the bf16 model's loss at
    each step of the float32 run (its weights and batch, before its update)."""
    data, _ = make_synthetic(num_train=512, num_test=0, seed=0)
    images, labels = data["train"]
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(labels)), 2))
    order = order[: STEPS * BATCH].reshape(STEPS, BATCH)
    mean, std = NORMALIZATION["cifar10"]
    out = {}
    bf16_apply = models.get_model("resnet18", width=WIDTH, dtype=jnp.bfloat16).apply
    train_step = steps.make_train_step(mean, std, "flip")
    shadow = []
    for dtype in (jnp.float32, jnp.bfloat16):
        model = models.get_model("resnet18", width=WIDTH, dtype=dtype)
        state = create_train_state(model, optim.make_optimizer(Config(), optax.constant_schedule(0.05)), seed=0)
        losses = []
        for rows in order:
            batch = {"image": jnp.asarray(images[rows]), "label": jnp.asarray(labels[rows])}
            if dtype == jnp.float32:  # the bf16 forward on these weights (a copy: the step donates its state)
                _, metrics = train_step(jax.tree.map(jnp.copy, state.replace(apply_fn=bf16_apply)), batch)
                shadow.append(float(metrics["loss_sum"] / metrics["count"]))
            state, metrics = train_step(state, batch)
            assert _float_dtypes(metrics) == {jnp.dtype(jnp.float32)}
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
        out[jnp.dtype(dtype).name] = (state, np.asarray(losses))
    out["shadow"] = np.asarray(shadow)
    return out


def test_bfloat16_run_reaches_the_float32_loss(runs):
    (_, f32), (_, bf16) = runs["float32"], runs["bfloat16"]
    assert abs(bf16[0] - f32[0]) <= U * f32[0]  # same initial weights: only forward rounding differs
    assert f32[-LAST:].mean() < 0.3 and bf16[-LAST:].mean() < 0.3  # both learned (from ~2.4)
    # the bf16 forward on the float32 run's weights, step by step: agreement within bf16 rounding
    rel = np.abs(runs["shadow"] - f32) / f32
    assert rel.max() <= 5 * U, np.round(rel / U, 2)


def test_bfloat16_loss_is_float32_cross_entropy_of_the_logits(runs):
    """At the trained weights (losses ~0.03, where bf16 arithmetic in the loss would be ~1 % off), the
    training loss of the bf16 model is the float32 cross-entropy of the float32 logits it produced in that
    step (captured inside the jitted step, so the very same rounding), recomputed here in float64."""
    state = runs["float32"][0]
    model = models.get_model("resnet18", width=WIDTH, dtype=jnp.bfloat16)
    captured = []

    def apply_and_capture(variables, x, **kwargs):
        logits, updates = model.apply(variables, x, **kwargs)
        assert logits.dtype == jnp.float32
        jax.debug.callback(lambda v: captured.append(np.asarray(v, np.float64)), logits)
        return logits, updates

    data, _ = make_synthetic(num_train=512, num_test=0, seed=0)  # the training images
    images, labels = data["train"]
    mean, std = NORMALIZATION["cifar10"]
    step = jax.jit(functools.partial(steps.train_step, mean=mean, std=std, augment="none"))
    for rows in np.arange(64).reshape(4, 16):
        batch = {"image": jnp.asarray(images[rows]), "label": jnp.asarray(labels[rows])}
        _, metrics = step(state.replace(apply_fn=apply_and_capture), batch)
        jax.effects_barrier()
        logits = captured.pop()
        top = logits.max(-1)
        nll = np.log(np.exp(logits - top[:, None]).sum(-1)) + top - logits[np.arange(16), labels[rows]]
        assert nll.mean() < 0.3  # trained: small losses, where bf16 arithmetic would show
        np.testing.assert_allclose(float(metrics["loss_sum"] / metrics["count"]), nll.mean(), rtol=1e-5)


def test_bfloat16_state_stays_float32(runs):
    state = runs["bfloat16"][0]
    f32 = {jnp.dtype(jnp.float32)}
    assert _float_dtypes(state.params) == f32
    assert _float_dtypes(state.opt_state) == f32
    assert _float_dtypes(state.batch_stats) == f32
    logits = jax.jit(lambda v, x: state.apply_fn(v, x, train=False))(
        {"params": state.params, "batch_stats": state.batch_stats}, jnp.zeros((2, 32, 32, 3))
    )
    assert logits.dtype == jnp.float32


def test_batchnorm_statistics_are_float32_reductions_of_bfloat16_activations():
    """The model's BatchNorm in bfloat16 (Flax's default ``force_float32_reductions``) reduces the
    bf16 activations in float32 and keeps float32 running statistics: the updated mean equals 0.1 x
    the float32 mean of the bf16 input (momentum 0.9, initial mean 0), the output is bfloat16."""
    bn = nn.BatchNorm(use_running_average=False, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=jnp.bfloat16)
    x = (3.0 + jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 4))).astype(jnp.bfloat16)
    variables = bn.init(jax.random.PRNGKey(0), x)
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    assert y.dtype == jnp.bfloat16
    assert stats["mean"].dtype == jnp.float32 and stats["var"].dtype == jnp.float32
    want_mean = 0.1 * jnp.mean(x.astype(jnp.float32), axis=(0, 1, 2))
    want_var = 0.9 + 0.1 * jnp.var(x.astype(jnp.float32), axis=(0, 1, 2))
    np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-6)
    np.testing.assert_allclose(stats["var"], want_var, rtol=1e-5)  # Flax's E[x^2] - E[x]^2 rounding
