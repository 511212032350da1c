"""Model structure: parameter counts, stage shapes, registry, perturbations, dtypes."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxcifar import models
from jaxcifar.state import init_variables, param_count


def _abstract_variables(model, shape=(1, 32, 32, 3)):
    return jax.eval_shape(
        lambda k: model.init(k, jnp.zeros(shape), train=False, mutable=["params", "batch_stats"]),
        jax.random.PRNGKey(0),
    )


@pytest.mark.parametrize(("name", "expected"), [("resnet18", 11_173_962), ("resnet34", 21_282_122)])
def test_parameter_count_matches_pytorch_reference(name, expected):
    variables = _abstract_variables(models.get_model(name, num_classes=10))
    assert param_count(variables["params"]) == expected
    assert set(variables) == {"params", "batch_stats"}  # no perturbations in the train state


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_stage_outputs_are_reachable_with_expected_shapes(name):
    model = models.get_model(name)
    variables = _abstract_variables(model)
    x = jnp.zeros((2, 32, 32, 3))
    logits, state = jax.eval_shape(lambda v: model.apply(v, x, train=False, mutable=["intermediates"]), variables)
    chex.assert_shape(logits, (2, 10))
    inter = state["intermediates"]
    chex.assert_shape(inter["layer1"][0], (2, 32, 32, 64))
    chex.assert_shape(inter["layer2"][0], (2, 16, 16, 128))
    chex.assert_shape(inter["layer3"][0], (2, 8, 8, 256))
    chex.assert_shape(inter["layer4"][0], (2, 4, 4, 512))


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="airbench, resnet18, resnet34, resnet9"):
        models.get_model("resnet50")
    assert models.available_models() == ("airbench", "resnet18", "resnet34", "resnet9")


def test_perturbations_expose_stage_gradients_without_changing_forward():
    model = models.get_model("resnet18", width=4)
    variables = init_variables(model, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    plain = model.apply(variables, x, train=False)
    perturbations = model.init(jax.random.PRNGKey(0), x, train=False)["perturbations"]
    assert set(perturbations) == set(models.STAGE_NAMES)
    with_perturb = model.apply({**variables, "perturbations": perturbations}, x, train=False)
    chex.assert_trees_all_close(plain, with_perturb)

    def logit_sum(p):
        return model.apply({**variables, "perturbations": p}, x, train=False)[:, 0].sum()

    grads = jax.grad(logit_sum)(perturbations)
    chex.assert_shape(grads["layer3"], (2, 8, 8, 16))
    assert float(jnp.abs(grads["layer4"]).sum()) > 0


def test_train_mode_updates_batch_stats_and_bfloat16_keeps_float32_params():
    model = models.get_model("resnet18", width=4, dtype=jnp.bfloat16)
    variables = init_variables(model, jax.random.PRNGKey(0))
    chex.assert_trees_all_equal_dtypes(
        variables["params"], jax.tree.map(lambda a: a.astype(jnp.float32), variables["params"])
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32
    chex.assert_shape(logits, (4, 10))
    before = variables["batch_stats"]["bn1"]["mean"]
    after = updates["batch_stats"]["bn1"]["mean"]
    assert float(jnp.abs(after - before).max()) > 0


class _OneConvBlock(nn.Module):
    """A block of a single conv-norm-ReLU, to show that ResNet builds whatever ``block_cls`` it is given."""

    features: int
    conv: Any
    norm: Any
    strides: int = 1
    activation: Any = nn.relu

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.features, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)), name="conv")(x)
        return self.activation(self.norm(name="bn")(x))


class _NoScaleBatchNorm(nn.BatchNorm):
    use_scale: bool = False


def test_resnet_takes_its_block_and_norm_as_parameters():
    model = models.ResNet(stage_sizes=(1, 1, 1, 1), block_cls=_OneConvBlock, norm=_NoScaleBatchNorm, width=4)
    variables = _abstract_variables(model)
    params = variables["params"]
    assert set(params["layer2_0"]) == {"conv", "bn"}  # the given block, not BasicBlock
    assert set(params["bn1"]) == {"bias"} and set(params["layer4_0"]["bn"]) == {"bias"}  # the stem's norm too
    chex.assert_shape(params["layer4_0"]["conv"]["kernel"], (3, 3, 16, 32))
    logits = model.apply(_init_params(model), jnp.zeros((2, 32, 32, 3)), train=False)
    chex.assert_shape(logits, (2, 10))


def _init_params(model):
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
