"""The train step's augmentation pipeline: policies, random erasing, coarse dropout and affine from Config."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcifar import augment_ops, steps, transforms
from jaxcifar.augmentation import AugmentSpec, augment_batch, mean_levels
from jaxcifar.autoaugment import POLICIES
from jaxcifar.config import Config
from jaxcifar.errors import ConfigError
from jaxcifar.mixing import MixSpec
from jaxcifar.state import create_train_state

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def images() -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(0), (16, 32, 32, 3), 1, 256).astype(jnp.uint8)


class PoolNormDense(nn.Module):
    """Average pool, BatchNorm, Dense: a train step that compiles in a moment."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train)(x.mean(axis=(1, 2)))
        return nn.Dense(10)(x)


# Each policy compiles its own step (~10 s of CPU here): "none" (with affine, erasing, dropout) in the quick
# tier, the policies in the slow one (test_policy_and_extras_change_most_images runs TrivialAugmentWide quickly).
QUICK = ("none",)


@pytest.mark.parametrize("policy", [p if p in QUICK else pytest.param(p, marks=pytest.mark.slow) for p in POLICIES])
def test_train_step_runs_with_each_policy(images, policy):
    """One jitted train step per policy, composed with crop, flip, cutout, affine, random erasing, coarse
    dropout and MixUp/CutMix: finite metrics, one step taken."""
    spec = AugmentSpec.from_config(Config(policy=policy, augment="crop-flip-cutout", **EXTRAS))
    state = create_train_state(PoolNormDense(), optax.sgd(0.1), 0)
    batch = {"image": images, "label": jnp.arange(16) % 10}
    state, metrics = steps.make_train_step(MEAN, STD, spec, mix=MixSpec(0.2, 1.0))(state, batch)
    chex.assert_tree_all_finite(metrics)
    assert int(state.step) == 1 and float(metrics["count"]) == 16


EXTRAS = dict(affine_degrees=10.0, affine_translate=0.1, random_erasing=0.5, coarse_dropout=0.5)


@pytest.mark.parametrize("changes", [{"policy": "trivialaugment"}, EXTRAS])
def test_policy_and_extras_change_most_images(images, changes):
    """A policy (or affine + erasing + dropout) on top of crop-flip-cutout changes most of the batch."""
    spec = AugmentSpec.from_config(Config(augment="crop-flip-cutout", **changes))
    key = jax.random.PRNGKey(3)
    out = jax.jit(augment_batch, static_argnums=(2, 3))(key, images, spec, MEAN)
    chex.assert_type(out, jnp.uint8)
    chex.assert_shape(out, images.shape)
    plain = transforms.augment(key, images, "crop-flip-cutout", 8)
    assert (np.asarray(out) != np.asarray(plain)).any(axis=(1, 2, 3)).mean() > 0.5


@pytest.mark.parametrize("mode", transforms.AUGMENT_MODES)
def test_without_extras_the_batch_is_exactly_transforms_augment(images, mode):
    """--augment alone keeps its old meaning, bit for bit (same keys, same ops)."""
    key = jax.random.PRNGKey(4)
    spec = AugmentSpec.from_config(Config(augment=mode, cutout_size=6))
    np.testing.assert_array_equal(augment_batch(key, images, spec, MEAN), transforms.augment(key, images, mode, 6))


def test_coarse_dropout_fills_holes_of_the_size_range_with_the_mean(images):
    """p = 1: every image gets 2 or 3 holes of side 4..6 filled with the dataset mean in uint8 levels; p = 0: none."""
    fill = mean_levels(MEAN)
    assert fill == (125.0, 123.0, 114.0)
    flat = jnp.full((128, 32, 32, 3), 7, jnp.uint8)
    dropout = jax.jit(augment_ops.coarse_dropout, static_argnums=(2, 3, 4, 5))
    out = np.asarray(dropout(jax.random.PRNGKey(5), flat, 1.0, (2, 3), (4, 6), fill))
    holes = (out != 7).any(-1)
    np.testing.assert_array_equal(out[holes], np.broadcast_to(np.float32(fill), out[holes].shape))
    areas = holes.sum((1, 2))
    assert areas.min() >= 16 and areas.max() <= 3 * 36, (areas.min(), areas.max())
    assert areas.max() > 2 * 36  # some images got three large holes
    rows = holes.any(2)
    assert rows.sum(1).min() >= 4  # a hole spans at least 4 rows
    untouched = dropout(jax.random.PRNGKey(5), flat, 0.0, (2, 3), (4, 6), fill)
    np.testing.assert_array_equal(untouched, flat)


@pytest.mark.parametrize(
    "spec",
    [
        AugmentSpec(mode="none", random_erasing=1.0, random_erasing_fill="mean"),
        AugmentSpec(mode="none", coarse_dropout=1.0, coarse_dropout_size=(4, 8)),
    ],
    ids=["random-erasing", "coarse-dropout"],
)
def test_pipeline_fills_with_the_dataset_mean(spec):
    """Random erasing (fill mean) and coarse dropout through the pipeline, p = 1: boxes of the mean levels."""
    flat = jnp.full((64, 32, 32, 3), 7, jnp.uint8)
    out = np.asarray(jax.jit(augment_batch, static_argnums=(2, 3))(jax.random.PRNGKey(6), flat, spec, MEAN))
    erased = (out != 7).any(-1)
    assert erased.any((1, 2)).mean() > 0.9  # p = 1: all but the (rare) images where no erasing draw fits
    np.testing.assert_array_equal(out[erased], np.broadcast_to(np.float32(mean_levels(MEAN)), out[erased].shape))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"randaugment_m": 31}, r"--randaugment-m must be in \[0, --policy-bins\)"),
        ({"policy": "augmix"}, "--policy: 'augmix' is not one of none, autoaugment, randaugment, trivialaugment"),
        ({"random_erasing": 1.5}, r"--random-erasing must be in \[0, 1\]"),
        ({"coarse_dropout_holes": (3, 1)}, "--coarse-dropout-holes must be two integers MIN MAX"),
        ({"coarse_dropout_size": (4,)}, "--coarse-dropout-size must be two integers MIN MAX"),
        ({"affine_translate": 1.0}, r"--affine-translate must be in \[0, 1\)"),
    ],
)
def test_bad_augmentation_values_name_the_flag(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config(**changes)


def test_augmentation_flags_round_trip_through_config_json(tmp_path):
    config = Config(policy="trivialaugment", coarse_dropout=0.5, coarse_dropout_size=(8, 12), interpolation="bilinear")
    config.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == config
