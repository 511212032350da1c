"""Advanced training policies: LR range test, EMA, MixUp/CutMix, TTA, OneCycle momentum cycling."""

from __future__ import annotations

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcifar import Config, load_dataset, optim, steps, transforms
from jaxcifar.checkpoint import Checkpointer
from jaxcifar.lr_find import lr_find, valley
from jaxcifar.mixing import MixSpec, mix_batch, mix_targets
from jaxcifar.state import TrainState, create_train_state
from jaxcifar.trainer import build_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def tiny():
    """A width-4 ResNet18 config and the synthetic data (256 train images)."""
    config = Config(data_source="synthetic", width=4, batch_size=32, train_subset=256, test_subset=64, epochs=2)
    return config, load_dataset(config)


def test_lr_find_suggests_the_loss_minimum_and_stops_on_divergence(tiny, tmp_path):
    config, data = tiny
    config = config.replace(lr_find_start=1e-4, lr_find_end=100.0, lr_find_steps=48, augment="none")
    result = lr_find(config, data, out_dir=tmp_path, verbose=False)
    assert result.stopped_early  # LR 100 diverges long before the last step
    assert len(result.lrs) < 48
    assert result.lrs[0] == pytest.approx(1e-4)
    i = int(np.argmin(np.abs(result.lrs - result.suggestion)))
    assert result.lrs[0] < result.suggestion < result.lrs[-1]
    assert result.smoothed[i] < result.smoothed[0]  # the loss fell to there
    # the lowest smoothed loss, once fastai's cut (first 10 %, last 5 points) is made
    finite = result.smoothed[np.isfinite(result.smoothed)]
    assert result.rule == "minimum" and result.smoothed[i] == finite[len(finite) // 10 : -5].min()
    assert set(result.rules) == {"minimum", "valley", "steepest", "minimum/10"}
    assert (tmp_path / "lr_find.png").stat().st_size > 0 and (tmp_path / "lr_find.json").is_file()


def test_valley_rule_on_a_known_curve():
    lrs = np.logspace(-5, 1, 61)
    losses = np.concatenate([np.full(10, 2.3), np.linspace(2.3, 0.5, 30), np.linspace(0.5, 5.0, 21)])
    assert 1e-4 < valley(lrs, losses) < lrs[40]


def _run_steps(config, data, n, ema_decay):
    tx = optim.make_optimizer(config, optax.constant_schedule(0.05))
    state = create_train_state(build_model(config), tx, 0, ema=ema_decay is not None)
    step = steps.make_train_step(data.mean, data.std, "none", ema_decay=ema_decay)
    batch = {"image": jnp.asarray(data.train.images[:32]), "label": jnp.asarray(data.train.labels[:32])}
    params = [jax.device_get(state.params)]
    for _ in range(n):
        state, _ = step(state, batch)
        params.append(jax.device_get(state.params))
    return state, params


@pytest.fixture(scope="module")
def ema_runs(tiny):
    """Three train steps with EMA decay 0.0 and with 0.7: {decay: (state, params after each step)}."""
    config, data = tiny
    return {decay: _run_steps(config, data, 3, ema_decay=decay) for decay in (0.0, 0.7)}


def test_ema_with_decay_zero_is_the_raw_weights(ema_runs):
    state, _ = ema_runs[0.0]
    chex.assert_trees_all_close(state.ema_params, state.params)
    chex.assert_trees_all_close(state.ema_batch_stats, state.batch_stats)


def test_ema_matches_the_closed_form(ema_runs):
    decay = 0.7
    state, params = ema_runs[decay]
    # ema_k = d * ema_{k-1} + (1 - d) * p_k, ema_0 = p_0
    expected = params[0]
    for p in params[1:]:
        expected = jax.tree.map(lambda e, q: decay * e + (1 - decay) * q, expected, p)
    chex.assert_trees_all_close(state.ema_params, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])


def test_checkpoint_keeps_the_ema_weights(tiny, ema_runs, tmp_path):
    config, _ = tiny
    state, _ = ema_runs[0.7]
    checkpointer = Checkpointer(tmp_path, keep=1)
    checkpointer.save(state, {"epoch": 1, "history": [], "best": 0.0}, is_best=True)
    checkpointer.wait()
    tx = optim.make_optimizer(config, optax.constant_schedule(0.05))
    template = create_train_state(build_model(config), tx, 1, ema=True)
    restored, meta = checkpointer.restore_latest(template)
    checkpointer.close()
    chex.assert_trees_all_equal(restored.ema_params, state.ema_params)
    chex.assert_trees_all_equal(restored.ema_batch_stats, state.ema_batch_stats)
    assert meta["epoch"] == 1


@pytest.fixture(scope="module")
def batch():
    images = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
    targets = optax.smooth_labels(jax.nn.one_hot(jnp.arange(8) % 10, 10), 0.1)
    return images, targets


@pytest.mark.parametrize("spec", [MixSpec(mixup_alpha=0.4), MixSpec(cutmix_alpha=1.0), MixSpec(0.4, 1.0)])
def test_mixed_batch_shapes_and_label_sums(batch, spec):
    images, targets = batch
    for seed in range(5):
        mixed, lam = mix_batch(jax.random.PRNGKey(seed), images, jnp.int32(0), spec)
        soft = mix_targets(targets, lam)
        chex.assert_shape(mixed, images.shape)
        chex.assert_shape(soft, targets.shape)
        chex.assert_trees_all_close(soft.sum(-1), jnp.ones(8), atol=1e-6)
        assert 0.0 <= float(lam) <= 1.0


def test_cutmix_box_area_matches_lambda(batch):
    images, _ = batch
    for seed in range(8):
        mixed, lam = mix_batch(jax.random.PRNGKey(seed), images, jnp.int32(0), MixSpec(cutmix_alpha=1.0))
        from_partner = np.asarray(jnp.all(mixed[0] == images[-1], axis=-1) & jnp.any(mixed[0] != images[0], axis=-1))
        assert from_partner.mean() == pytest.approx(1.0 - float(lam), abs=1e-6)


def test_mixup_blends_with_the_mirrored_batch(batch):
    images, _ = batch
    mixed, lam = mix_batch(jax.random.PRNGKey(3), images, jnp.int32(0), MixSpec(mixup_alpha=0.4))
    chex.assert_trees_all_close(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-6)


@pytest.mark.parametrize("spec", [MixSpec(), MixSpec(0.4, 1.0, prob=0.0), MixSpec(0.4, 1.0, until_step=5)])
def test_disabled_mixing_leaves_the_batch_unchanged(batch, spec):
    images, targets = batch
    mixed, lam = mix_batch(jax.random.PRNGKey(0), images, jnp.int32(7), spec)
    assert float(lam) == 1.0
    chex.assert_trees_all_equal(mixed, images)
    chex.assert_trees_all_close(mix_targets(targets, lam), targets)


def test_tta_views_shapes():
    images = jnp.zeros((4, 32, 32, 3))
    assert transforms.tta_views(images, "none").shape == (1, 4, 32, 32, 3)
    assert transforms.tta_views(images, "flip").shape == (2, 4, 32, 32, 3)
    assert transforms.tta_views(images, "flip-translate").shape == (6, 4, 32, 32, 3)
    with pytest.raises(ValueError, match="unknown TTA mode"):
        transforms.tta_views(images, "rotate")


class PoolThenDense(nn.Module):
    """Global average pool then Dense: exactly invariant to horizontal flips."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(10, name="linear")(x.mean(axis=(1, 2)))


def test_tta_flip_changes_nothing_for_a_flip_invariant_model():
    model = PoolThenDense()
    images = jax.random.randint(jax.random.PRNGKey(0), (16, 32, 32, 3), 0, 256).astype(jnp.uint8)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1), batch_stats={}, rng=None)
    batch = {"image": images, "label": jnp.arange(16) % 10, "mask": jnp.ones(16, bool)}
    plain = steps.eval_step(state, batch, mean=MEAN, std=STD)
    flipped = steps.eval_step(state, batch, mean=MEAN, std=STD, tta="flip")
    chex.assert_trees_all_close(plain, flipped, rtol=1e-6)


def test_onecycle_momentum_matches_pytorch_documented_values():
    total = 100
    momentum = optim.onecycle_momentum_schedule(total, base_momentum=0.85, max_momentum=0.95)
    assert float(momentum(0)) == pytest.approx(0.95)  # OneCycleLR: starts at max_momentum
    assert float(momentum(29)) == pytest.approx(0.85)  # at the LR peak (pct_start * total - 1)
    assert float(momentum(99)) == pytest.approx(0.95)  # back to max_momentum at the end
    lr = optim.onecycle_schedule(total, 0.1)
    values = np.asarray(jax.vmap(momentum)(jnp.arange(total)))
    lrs = np.asarray(jax.vmap(lr)(jnp.arange(total)))
    # inverse to the LR: momentum is highest where the LR is lowest
    assert np.argmin(values) == np.argmax(lrs)


def test_cycled_momentum_is_what_the_optimizer_uses():
    config = Config(cycle_momentum=True, optimizer="sgd", nesterov=False, weight_decay=0.0)
    tx, _ = optim.make_training_optimizer(config, steps_per_epoch=5)  # 20 epochs x 5 = 100 steps
    params = {"w": jnp.zeros(3)}
    opt_state = tx.init(params)
    seen = []
    for _ in range(31):
        _, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
        seen.append(float(opt_state[-1].hyperparams["momentum"]))
    # injected hyperparameters hold the value used at the update just made (steps 0..30)
    assert seen[0] == pytest.approx(0.95) and seen[29] == pytest.approx(0.85)


def test_lr_find_cli_rejects_bad_values(capsys):
    from jaxcifar.lr_find import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data-source", "synthetic", "--lr-find-steps", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--lr-find-steps must be >= 5" in err and len(err.splitlines()) == 1


def test_train_lr_auto_runs_the_range_test_and_records_the_lr(tmp_path, capsys):
    from jaxcifar.train import main

    argv = ["--data-source", "synthetic", "--width", "4", "--batch-size", "32", "--train-subset", "128"]
    argv += ["--test-subset", "64", "--epochs", "1", "--max-lr", "auto", "--lr-find-steps", "12"]
    assert main([*argv, "--workdir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "from the LR range test (minimum)" in out
    saved = Config.load(tmp_path / "run" / "config.json")
    found = json.loads((tmp_path / "run" / "lr_find.json").read_text())["suggestion"]
    assert saved.lr == pytest.approx(found)  # the run records the LR it used
    assert (tmp_path / "run" / "lr_find.png").is_file()
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 1
