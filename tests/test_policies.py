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
from jaxcifar.network import build_model
from jaxcifar.state import TrainState, create_train_state

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


def _shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``images`` (B, H, W, C) moved by ``dy`` rows down and ``dx`` columns right (np.roll), with the pixels
    that wrap around set to zero: a 1-pixel translation with a zero-filled edge."""
    out = np.roll(images, (dy, dx), axis=(1, 2))
    if dy:
        out[:, 0 if dy > 0 else -1] = 0
    if dx:
        out[:, :, 0 if dx > 0 else -1] = 0
    return out


def test_tta_views_are_the_original_its_mirror_and_four_translations():
    images = np.asarray(jax.random.randint(jax.random.PRNGKey(5), (3, 32, 32, 3), 1, 256).astype(jnp.uint8))
    mirror = images[:, :, ::-1]
    np.testing.assert_array_equal(transforms.tta_views(jnp.asarray(images), "none"), images[None])
    np.testing.assert_array_equal(transforms.tta_views(jnp.asarray(images), "flip"), np.stack([images, mirror]))
    views = np.asarray(transforms.tta_views(jnp.asarray(images), "flip-translate"))
    chex.assert_shape(views, (6, 3, 32, 32, 3))
    np.testing.assert_array_equal(views[:2], np.stack([images, mirror]))
    # the four 1-pixel translations of the original, each once, in any order (the mean over views ignores it)
    expected = [_shifted(images, dy, dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    matches = [[i for i, e in enumerate(expected) if np.array_equal(view, e)] for view in views[2:]]
    assert sorted(i for found in matches for i in found) == [0, 1, 2, 3], matches


class FlattenThenDense(nn.Module):
    """Dense on the flattened pixels: its logits change when an image is mirrored."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(10, name="linear")(x.reshape(x.shape[0], -1))


def _eval_state(model: nn.Module) -> TrainState:
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1), batch_stats={}, rng=None)


def test_tta_flip_changes_nothing_for_a_flip_invariant_model():
    images = jax.random.randint(jax.random.PRNGKey(0), (16, 32, 32, 3), 0, 256).astype(jnp.uint8)
    labels = np.arange(16) % 10
    batch = {"image": images, "label": jnp.asarray(labels), "mask": jnp.ones(16, bool)}
    state = _eval_state(PoolThenDense())
    plain = steps.eval_step(state, batch, mean=MEAN, std=STD)
    flipped = steps.eval_step(state, batch, mean=MEAN, std=STD, tta="flip")
    chex.assert_trees_all_close(plain, {key: flipped[key] for key in plain}, rtol=1e-6)
    # A model that sees the mirror: TTA "flip" is the NLL of the mean softmax over the image and its
    # horizontal mirror (recomputed here), not over the image twice or its vertical flip.
    state = _eval_state(FlattenThenDense())
    x = (np.asarray(images, np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    probs = np.mean([jax.nn.softmax(state.apply_fn({"params": state.params}, v)) for v in (x, x[:, :, ::-1])], axis=0)
    want = {
        "loss_sum": -np.log(probs[np.arange(16), labels]).sum(),
        "correct": float((probs.argmax(-1) == labels).sum()),
        "count": 16.0,
    }
    got = jax.device_get(steps.eval_step(state, batch, mean=MEAN, std=STD, tta="flip"))
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5)
    plain = steps.eval_step(state, batch, mean=MEAN, std=STD)
    assert abs(float(plain["loss_sum"]) - want["loss_sum"]) > 1e-2  # the mirror view changed the prediction
    # The TTA step also returns the first view's (the unaltered images') sums: the plain evaluation's.
    np.testing.assert_allclose(
        [got["plain_loss_sum"], got["plain_correct"]], [plain["loss_sum"], plain["correct"]], rtol=1e-6
    )
    assert set(plain) == {"loss_sum", "correct", "count"}


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


def _pytorch_one_cycle(step: int, total: int, start: float, peak: float, end: float, pct_start: float) -> float:
    """PyTorch ``OneCycleLR``'s two cosine phases (its ``_annealing_cos``) at ``step``, written out in numpy:
    ``start`` at step 0, ``peak`` at step ``pct_start * total - 1``, ``end`` at step ``total - 1``."""
    peak_step = pct_start * total - 1
    if step <= peak_step:
        pct, a, b = step / peak_step, start, peak
    else:
        pct, a, b = (step - peak_step) / (total - 1 - peak_step), peak, end
    return b + (a - b) / 2 * (1 + np.cos(np.pi * pct))


@pytest.mark.parametrize("nesterov", [False, True])
def test_cycled_momentum_is_what_the_optimizer_uses(nesterov):
    """31 updates (past the LR peak at step 29) move the parameters exactly as PyTorch's
    ``SGD(momentum, nesterov, weight_decay)`` step under ``OneCycleLR(cycle_momentum=True)`` would, written
    out in numpy: d = g + wd * p; buf = m_k * buf + d; p -= lr_k * (d + m_k * buf if nesterov else buf)."""
    config = Config(cycle_momentum=True, optimizer="sgd", nesterov=nesterov, weight_decay=5e-4, epochs=20)
    total = 100
    tx, _ = optim.make_training_optimizer(config, steps_per_epoch=5)  # 20 epochs x 5 = 100 steps
    start = np.array([1.0, -2.0, 0.5])
    params = {"w": jnp.asarray(start, jnp.float32)}
    opt_state = tx.init(params)
    lr0 = config.lr / config.div_factor
    one_cycle = lambda k, a, b, c: _pytorch_one_cycle(k, total, a, b, c, config.pct_start)  # noqa: E731
    assert one_cycle(0, 0.95, 0.85, 0.95) == 0.95 and one_cycle(29, 0.95, 0.85, 0.95) == pytest.approx(0.85)
    p, buf = start, np.zeros(3)
    for k, g in enumerate(np.random.default_rng(0).normal(size=(31, 3))):
        updates, opt_state = tx.update({"w": jnp.asarray(g, jnp.float32)}, opt_state, params)
        params = optax.apply_updates(params, updates)
        lr = one_cycle(k, lr0, config.lr, lr0 / config.final_div_factor)
        m = one_cycle(k, config.max_momentum, config.base_momentum, config.max_momentum)
        d = g + config.weight_decay * p
        buf = m * buf + d  # PyTorch's first step sets buf = d: the same from buf = 0
        p = p - lr * (d + m * buf if nesterov else buf)
        np.testing.assert_allclose(params["w"], p, rtol=1e-5, atol=1e-6, err_msg=f"after update {k}")
    assert np.abs(p - start).max() > 0.5  # the updates moved the parameters


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
    lines = out.splitlines()
    order = ("devices:", "data:", "model:", "lr_find:", "lr:", "compiling the train and eval steps", "compile:")
    first = [next(i for i, line in enumerate(lines) if line.startswith(start)) for start in order]
    assert first == sorted(first), lines  # the wait before the compile is announced
    assert sum(line.startswith("devices:") for line in lines) == 1, lines  # one set-up: range test and training
    saved = Config.load(tmp_path / "run" / "config.json")
    found = json.loads((tmp_path / "run" / "lr_find.json").read_text())["suggestion"]
    assert saved.lr == pytest.approx(found)  # the run records the LR it used
    assert (tmp_path / "run" / "lr_find.png").is_file()
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 1
