"""Mixed precision (``--dtype bfloat16``): bf16 compute, float32 params, optimizer state, BN statistics,
logits and loss; a short run reaches the float32 run's loss.

Tolerance: over the last 5 of 30 SGD steps on the synthetic problem (ResNet18 width 8, batch 16), the
mean training loss of the bf16 run is within 0.1 nats of the float32 run's. Both fall from 2.44 to a
few hundredths (seen: 0.034 float32, 0.016 bfloat16); step-to-step differences are chaotic, up to
~0.25 mid-run, not a bias. The first step (same weights, forward rounding only) differs by < 0.02.
"""

from __future__ import annotations

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
LAST, LOSS_TOLERANCE = 5, 0.1


def _float_dtypes(tree) -> set:
    return {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.fixture(scope="module")
def runs():
    """The same 30 steps (same init, batches, flips) in float32 and in bfloat16:
    ``{dtype name: (final TrainState, per-step losses)}``."""
    data, _ = make_synthetic(num_train=512, num_test=0, seed=0)
    images, labels = data["train"]
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(labels)), 2))
    order = order[: STEPS * BATCH].reshape(STEPS, BATCH)
    mean, std = NORMALIZATION["cifar10"]
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = models.get_model("resnet18", width=WIDTH, dtype=dtype)
        state = create_train_state(model, optim.make_optimizer(Config(), optax.constant_schedule(0.05)), seed=0)
        train_step = steps.make_train_step(mean, std, "flip")
        losses = []
        for rows in order:
            state, metrics = train_step(state, {"image": jnp.asarray(images[rows]), "label": jnp.asarray(labels[rows])})
            assert _float_dtypes(metrics) == {jnp.dtype(jnp.float32)}
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
        out[jnp.dtype(dtype).name] = (state, np.asarray(losses))
    return out


def test_bfloat16_run_reaches_the_float32_loss(runs):
    (_, f32), (_, bf16) = runs["float32"], runs["bfloat16"]
    assert abs(bf16[0] - f32[0]) < 0.02  # same initial weights: only forward rounding differs
    assert f32[-LAST:].mean() < 0.3 and bf16[-LAST:].mean() < 0.3  # both learned (from ~2.4)
    assert abs(bf16[-LAST:].mean() - f32[-LAST:].mean()) <= LOSS_TOLERANCE, (f32, bf16)


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
