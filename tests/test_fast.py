"""Fast recipes: ResNet-9 and airbench's network, the whitening init, and the recipe pieces (optimizer groups,
decoupled weight decay, linear one-cycle, alternating flip, reflect translation, multi-crop TTA, Lookahead)."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcifar import gradcam, models, optim, steps, transforms
from jaxcifar.config import Config
from jaxcifar.errors import ConfigError
from jaxcifar.layout import RunDir
from jaxcifar.models.airbench import WHITEN_EPS, patch_second_moment, whitening_kernel, whitening_sample
from jaxcifar.state import TrainState, create_train_state, init_variables, param_count
from tests import torch_support

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _abstract(model):
    return jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False, mutable=["params", "batch_stats"]),
        jax.random.PRNGKey(0),
    )


def _images(n: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (n, 32, 32, 3) with correlated neighbouring pixels and channels (like photographs, unlike noise)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 32, 32, 1)).cumsum(axis=1).cumsum(axis=2)
    x = base + 0.5 * rng.normal(size=(n, 32, 32, 3))
    x = (x - x.min()) / (x.max() - x.min())
    return (255 * x).astype(np.uint8)


# Param counts: ResNet-9 as davidcpage/cifar10-fast's (convs and linear without bias, BN scale and bias);
# airbench: whitening 2*2*3*24 + 24, the six convs, BN biases only (no scale), linear 256 x 10 without bias.
@pytest.mark.parametrize(("name", "expected"), [("resnet9", 6_573_120), ("airbench", 1_971_640)])
def test_parameter_counts(name, expected):
    assert param_count(_abstract(models.get_model(name))["params"]) == expected


@pytest.mark.parametrize(
    ("name", "layers"),
    [
        ("resnet9", {"layer1": (16, 16, 128), "layer2": (8, 8, 256), "layer3": (4, 4, 512)}),
        ("airbench", {"block1": (15, 15, 64), "block2": (7, 7, 256), "block3": (3, 3, 256)}),
    ],
)
def test_stage_shapes_and_a_gradcam_layer_of_at_least_5_pixels(name, layers):
    model = models.get_model(name)
    variables = _abstract(model)
    x = jnp.zeros((2, 32, 32, 3))
    logits, state = jax.eval_shape(lambda v: model.apply(v, x, train=False, mutable=["intermediates"]), variables)
    chex.assert_shape(logits, (2, 10))
    for layer, shape in layers.items():
        chex.assert_shape(state["intermediates"][layer][0], (2, *shape))
    layer = models.gradcam_layer(model)
    assert gradcam.check_layer(model, variables, (2, 32, 32, 3), layer) == layers[layer][:2]
    assert min(layers[layer][:2]) >= gradcam.MIN_RESOLUTION


def test_airbench_convs_start_as_identity_and_its_batchnorm_has_no_scale():
    params = init_variables(models.get_model("airbench", width=4), jax.random.PRNGKey(0))["params"]
    kernel = np.asarray(params["group2"]["conv2"]["kernel"])  # 16 -> 16 channels: all dirac
    expected = np.zeros((3, 3, 16, 16), np.float32)
    expected[1, 1] = np.eye(16)
    np.testing.assert_array_equal(kernel, expected)
    first = np.asarray(params["group1"]["conv1"]["kernel"])  # 24 -> 4: the 4 filters are dirac on channels 0..3
    np.testing.assert_array_equal(first[1, 1, :4, :4], np.eye(4))
    assert set(params["group1"]["norm1"]) == {"bias"}


def test_whitening_filters_whiten_the_patches_they_were_computed_from():
    """The whitening conv's output (first 12 channels, before the bias) has second-moment matrix diag(l/(l+eps))
    over every 2x2 patch of the images it was computed from: the identity with eps 0, and its eigen-directions
    stay uncorrelated with airbench's eps."""
    images = _images()
    model = models.get_model("airbench", width=4)
    variables = init_variables(model, jax.random.PRNGKey(0))
    params = models.initial_params(model, variables["params"], images, MEAN, STD)
    x = transforms.normalize(jnp.asarray(images), MEAN, STD)
    params = {**params, "whiten": {**params["whiten"], "bias": jnp.zeros(24)}}
    _, state = model.apply({**variables, "params": params}, x, capture_intermediates=True, mutable=["intermediates"])
    out = np.asarray(state["intermediates"]["whiten"]["__call__"][0], np.float64).reshape(-1, 24)
    moment = out[:, :12].T @ out[:, :12] / len(out)
    eigenvalues = np.sort(np.linalg.eigvalsh(patch_second_moment(images, MEAN, STD)))[::-1]
    np.testing.assert_allclose(moment, np.diag(eigenvalues / (eigenvalues + WHITEN_EPS)), atol=2e-4)
    np.testing.assert_array_equal(out[:, 12:], -out[:, :12])
    exact = whitening_kernel(images, MEAN, STD, eps=0.0).reshape(12, 24)[:, :12]
    patches = np.linalg.cholesky(patch_second_moment(images, MEAN, STD))  # any P with P P^T = the moment
    np.testing.assert_allclose(exact.T @ patches @ patches.T @ exact, np.eye(12), atol=1e-3)


def test_whitening_statistics_come_from_the_whole_split_not_its_first_class():
    """An image-folder split is sorted by class: the whitening sample takes every (N // 5000)-th image, so a split
    whose first half is dark and second half bright is sampled from both halves, and at most 5,000 images."""
    dark = np.full((6000, 4, 4, 3), 20, np.uint8)
    bright = np.random.default_rng(0).integers(0, 256, (6000, 4, 4, 3), dtype=np.uint8)
    images = np.concatenate([dark, bright])
    sample = whitening_sample(images)
    assert sample.shape == (5000, 4, 4, 3)
    assert 2000 <= np.sum(sample.reshape(5000, -1).max(axis=1) > 20) <= 3000  # about half from each half
    np.testing.assert_array_equal(whitening_sample(images[:300]), images[:300])  # fewer than 5,000: all of them
    big = np.concatenate([np.full((6000, 32, 32, 3), 20, np.uint8), _images(6000)])
    model = models.get_model("airbench", width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(models.initial_params(model, params, big, MEAN, STD)["whiten"]["kernel"])
    np.testing.assert_allclose(kernel, whitening_kernel(big[::2][:5000], MEAN, STD), rtol=1e-5)
    assert not np.allclose(kernel, whitening_kernel(big[:5000], MEAN, STD), atol=1e-2)


def test_the_run_state_starts_from_the_data_whitening_and_the_optimizer_freezes_it():
    """create_train_state(init_params=...) sets the whitening filters; a step leaves them as they are, moves
    the whitening bias during --whiten-bias-epochs and never after."""
    images = _images(32)
    model = models.get_model("airbench", width=4)
    config = Config(model="airbench", width=4, whiten_bias_epochs=1, lr=0.5, batch_size=8, momentum=0.0)
    tx = optim.make_optimizer(config, optax.constant_schedule(0.5), steps_per_epoch=2)
    state = create_train_state(model, tx, 0, init_params=lambda p: models.initial_params(model, p, images, MEAN, STD))
    np.testing.assert_allclose(state.params["whiten"]["kernel"], whitening_kernel(images[:5000], MEAN, STD))
    step = jax.jit(lambda s, b: steps.train_step(s, b, mean=MEAN, std=STD, augment="none"))
    batch = {"image": jnp.asarray(images[:8]), "label": jnp.arange(8) % 10}
    kernels, biases = [state.params["whiten"]["kernel"]], [state.params["whiten"]["bias"]]
    for _ in range(4):
        state, _ = step(state, batch)
        kernels.append(state.params["whiten"]["kernel"])
        biases.append(state.params["whiten"]["bias"])
    for k in kernels[1:]:
        np.testing.assert_array_equal(k, kernels[0])
    assert not np.array_equal(biases[1], biases[0]) and not np.array_equal(biases[2], biases[1])  # epoch 1
    np.testing.assert_array_equal(biases[4], biases[2])  # frozen from step 2 (= 1 epoch x 2 steps) on
    assert not np.array_equal(state.params["group1"]["conv1"]["kernel"], jnp.zeros(()))


def test_after_the_whitening_bias_epochs_the_run_steps_without_its_backward(tmp_path):
    """From epoch --whiten-bias-epochs + 1 on, a run trains with the late train step: the whitening layer's
    parameters enter it as constants, so XLA drops the first convolution's input gradient (one convolution fewer
    in the compiled step), and that step moves every parameter as the full step does (the optimizer no longer
    moves the bias either way)."""
    from jaxcifar import loop, setup

    config = Config(
        model="airbench", width=4, data_source="synthetic", train_subset=64, test_subset=64, batch_size=32,
        eval_batch_size=64, epochs=3, whiten_bias_epochs=1, lr=0.2, workdir=str(tmp_path / "run"),
        compile_cache=False, async_checkpoints=False,
    )  # fmt: skip
    assert optim.late_frozen_params("airbench") == ("whiten/kernel", "whiten/bias")
    assert optim.late_frozen_params("resnet18") == ()
    assert setup.early_epochs(config) == 1 and setup.early_epochs(config.replace(whiten_bias_epochs=3)) is None
    assert setup.early_epochs(config.replace(model="resnet9")) is None
    run_setup = setup.RunSetup.create(config, verbose=False)
    tx, schedule = run_setup.training_optimizer()
    state = run_setup.initial_state(tx)
    run = loop.set_up(run_setup, state, [], schedule, RunDir(config.workdir), verbose=False)
    try:
        assert run.late_train_step is not None
        assert run.train_step_for(1) is run.train_step
        assert run.train_step_for(2) is run.late_train_step is run.train_step_for(3)

        def convolutions(compiled) -> int:
            return compiled.as_text().count(" convolution(")

        assert convolutions(run.late_train_step) == convolutions(run.train_step) - 1
        state, _ = loop.train_epoch(run, state, 1)
        batch = run_setup.batch(run_setup.epoch_rows(2), 0)
        full, _ = run.train_step(jax.tree.map(jnp.copy, state), batch)
        late, _ = run.late_train_step(jax.tree.map(jnp.copy, state), batch)
        for stepped in (full, late):
            np.testing.assert_array_equal(stepped.params["whiten"]["bias"], state.params["whiten"]["bias"])
        assert not np.allclose(full.params["group1"]["conv1"]["kernel"], state.params["group1"]["conv1"]["kernel"])
        chex.assert_trees_all_close(late.params, full.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(late.batch_stats, full.batch_stats, rtol=1e-5, atol=1e-6)
    finally:
        run.writer.close()
        run.checkpointer.close()


def test_batchnorm_bias_lr_multiplier_keeps_the_decay_per_step():
    """Plain SGD: a BatchNorm bias moves by -lr * mult * g - lr * wd * p; other parameters by -lr * (g + wd * p)."""
    params = {"bn1": {"bias": jnp.array([1.0]), "scale": jnp.array([2.0])}, "conv": {"kernel": jnp.array([3.0])}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    config = Config(bn_bias_lr_mult=64.0, weight_decay=0.01, momentum=0.0)
    tx = optim.make_optimizer(config, optax.constant_schedule(0.1))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["bn1"]["bias"], [-0.1 * 64 * 0.5 - 0.1 * 0.01 * 1.0], rtol=1e-6)
    np.testing.assert_allclose(updates["bn1"]["scale"], [-0.1 * (0.5 + 0.01 * 2.0)], rtol=1e-6)
    np.testing.assert_allclose(updates["conv"]["kernel"], [-0.1 * (0.5 + 0.01 * 3.0)], rtol=1e-6)


def test_whitening_bias_lr_multiplier_and_its_linear_decay():
    """Plain SGD on the whitening bias over steps_per_epoch 4 and --whiten-bias-epochs 1: the bias moves by
    -lr * mult * g - lr * wd * p (the decay per step unchanged, as the BatchNorm biases' multiplier); with
    --whiten-bias-decay the LR falls as 1 - t / 4 (airbench94_muon's whiten_bias_train_steps), and stops at step 4
    either way; the head keeps the schedule's LR."""
    params = {"whiten": {"bias": jnp.array([1.0])}, "linear": {"kernel": jnp.array([3.0])}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    config = Config(
        model="airbench", lr=0.1, whiten_bias_lr_mult=8.0, whiten_bias_epochs=1, weight_decay=0.01, momentum=0.0
    )
    for decay, factors in ((False, [1, 1, 1, 1, 0, 0]), (True, [1, 0.75, 0.5, 0.25, 0, 0])):
        tx = optim.make_optimizer(
            config.replace(whiten_bias_decay=decay), optax.constant_schedule(0.1), steps_per_epoch=4
        )
        state = tx.init(params)
        for t, factor in enumerate(factors):
            updates, state = tx.update(grads, state, params)
            expected = -0.1 * factor * (8.0 * 0.5 + 0.01 * 1.0)
            np.testing.assert_allclose(updates["whiten"]["bias"], [expected], rtol=1e-6, atol=1e-9, err_msg=str(t))
            np.testing.assert_allclose(updates["linear"]["kernel"], [-0.1 * (0.5 + 0.01 * 3.0)], rtol=1e-6)


def test_linear_schedule_falls_from_lr_to_zero_at_the_last_step():
    schedule = optim.make_schedule(Config(schedule="linear", lr=0.5, epochs=2), steps_per_epoch=5)
    np.testing.assert_allclose([float(schedule(t)) for t in (0, 1, 5, 9, 10)], [0.5, 0.45, 0.25, 0.05, 0.0], atol=1e-7)


def test_gradient_clipping_sees_every_group_at_once():
    """grads (3, 4) have global norm 5: clipped to norm 1 they are (0.6, 0.8), whatever group each is in."""
    params = {"bn1": {"bias": jnp.array([1.0])}, "conv": {"kernel": jnp.array([1.0])}}
    grads = {"bn1": {"bias": jnp.array([3.0])}, "conv": {"kernel": jnp.array([4.0])}}
    tx = optim.make_optimizer(
        Config(bn_bias_lr_mult=2.0, grad_clip=1.0, weight_decay=0.0, momentum=0.0), optax.constant_schedule(0.1)
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["bn1"]["bias"], [-0.1 * 2.0 * 0.6], rtol=1e-6)
    np.testing.assert_allclose(updates["conv"]["kernel"], [-0.1 * 0.8], rtol=1e-6)


def test_decoupled_weight_decay_is_airbenchs_per_batch_decay():
    airbench = Config(
        lr=11.5 / (1 + 1 / (1 - 0.85)), momentum=0.85, weight_decay=0.0153, batch_size=1024, decoupled_weight_decay=True
    )
    assert optim.coupled_weight_decay(airbench) == pytest.approx(0.0153 / 11.5)  # airbench94's wd / lr
    # the decay per step (lr x coefficient) ignores the peak LR and grows with the batch
    doubled_lr = airbench.replace(lr=2 * airbench.lr)
    assert doubled_lr.lr * optim.coupled_weight_decay(doubled_lr) == pytest.approx(
        airbench.lr * optim.coupled_weight_decay(airbench)
    )
    half = airbench.replace(batch_size=512)
    assert optim.coupled_weight_decay(half) == pytest.approx(optim.coupled_weight_decay(airbench) / 2)
    assert optim.coupled_weight_decay(airbench.replace(decoupled_weight_decay=False)) == 0.0153
    with pytest.raises(ConfigError, match="--decoupled-weight-decay needs a numeric --lr"):
        Config(decoupled_weight_decay=True, lr="auto")


def test_linear_onecycle_is_airbenchs_lr_schedule():
    total = 476  # airbench94: ceil(48 steps x 9.9 epochs)

    def airbench_lr(step):  # legacy/airbench94.py get_lr, times the peak LR
        warmup = int(total * 0.23)
        if step < warmup:
            return 0.2 * (1 - step / warmup) + step / warmup
        frac = (step - warmup) / (total - warmup)
        return 1.0 * (1 - frac) + 0.07 * frac

    schedule = optim.linear_onecycle_schedule(total, 2.0, pct_start=0.23, div_factor=5.0, final_div_factor=0.2 / 0.07)
    ours = np.asarray(jax.vmap(schedule)(jnp.arange(total + 1)))
    np.testing.assert_allclose(ours, [2.0 * airbench_lr(s) for s in range(total + 1)], rtol=1e-5)


def test_alternating_flip_flips_each_image_on_exactly_every_other_epoch():
    index = jnp.arange(1000)
    flips = np.stack([transforms.alternating_flip(jax.random.PRNGKey(7), index, jnp.int32(e)) for e in range(6)])
    np.testing.assert_array_equal(flips[1:], ~flips[:-1])  # every image changes every epoch
    assert 400 < flips[0].sum() < 600  # a fair coin decides epoch 0
    images = jnp.asarray(_images(4))
    out = transforms.augment(jax.random.PRNGKey(0), images, "flip", flip=jnp.array([True, False, True, False]))
    np.testing.assert_array_equal(out, jnp.stack([images[0, :, ::-1], images[1], images[2, :, ::-1], images[3]]))


def test_train_step_with_alternating_flip_mirrors_an_image_on_alternate_epochs():
    """Through the real train step: a linear model (logit 0 = sum(x * w)), so each SGD step moves ``w`` along
    the image the step saw; batch 1, one step per epoch. The image seen alternates between the original and
    its mirror, epoch after epoch."""

    def apply_fn(variables, x, train, mutable):
        logit = jnp.sum(x * variables["params"]["w"], axis=(1, 2, 3))
        return jnp.zeros((x.shape[0], 10)).at[:, 0].set(logit), {"batch_stats": {}}

    image = jnp.asarray(_images(1))
    x = np.asarray(transforms.normalize(image, MEAN, STD))[0].ravel()
    mirror = np.asarray(transforms.normalize(image[:, :, ::-1], MEAN, STD))[0].ravel()
    state = TrainState.create(apply_fn=apply_fn, params={"w": jnp.zeros((32, 32, 3))}, tx=optax.sgd(1e-3),
                              batch_stats={}, rng=jax.random.PRNGKey(0))  # fmt: skip
    batch = {"image": image, "label": jnp.zeros(1, jnp.int32), "index": jnp.array([3])}
    step = jax.jit(lambda s, b: steps.train_step(s, b, mean=MEAN, std=STD, augment="flip", flip_epoch_steps=1))
    seen = []
    for _ in range(6):
        before = np.asarray(state.params["w"]).ravel()
        state, _ = step(state, batch)
        delta = np.asarray(state.params["w"]).ravel() - before
        cosine = [float(delta @ v / np.linalg.norm(delta) / np.linalg.norm(v)) for v in (x, mirror)]
        assert max(cosine) == pytest.approx(1.0, abs=1e-5)
        seen.append(int(np.argmax(cosine)))
    assert seen in ([0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0])


def test_reflect_padding_and_crop_windows():
    images = jnp.asarray(_images(8))
    padded = np.asarray(transforms.pad_images(images, 2, "reflect"))
    np.testing.assert_array_equal(padded, np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), "reflect"))
    out = np.asarray(transforms.random_crop(jax.random.PRNGKey(1), images, padding=2, pad_mode="reflect"))
    for b in range(len(out)):
        windows = [padded[b, dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(out[b], w) for w in windows)
    with pytest.raises(ValueError, match="unknown pad mode 'edge'; one of zeros, reflect"):
        transforms.pad_images(images, 2, "edge")


def test_multi_crop_tta_views_and_weights_by_hand():
    x = jnp.arange(9, dtype=jnp.float32).reshape(1, 3, 3, 1)  # rows [0 1 2] [3 4 5] [6 7 8]
    views = np.asarray(transforms.tta_views(x, "multi-crop"))[:, 0, :, :, 0]
    # reflect-padded by 1: row -1 is row 1, column -1 is column 1
    up_left = [[4, 3, 4], [1, 0, 1], [4, 3, 4]]  # crop at (0, 0) of the padded image
    down_right = [[4, 5, 4], [7, 8, 7], [4, 5, 4]]  # crop at (2, 2)
    expected = [
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
        [[2, 1, 0], [5, 4, 3], [8, 7, 6]],
        up_left,
        [r[::-1] for r in up_left],
        down_right,
        [r[::-1] for r in down_right],
    ]
    np.testing.assert_array_equal(views, np.array(expected, np.float32))
    logits = jnp.array([[[1.0, 0.0]], [[3.0, 0.0]], [[0.0, 8.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]])
    combined = transforms.tta_log_probs(logits, "multi-crop")  # weighted mean of logits: [1/4 + 3/4, 8/8] = [1, 1]
    np.testing.assert_allclose(np.exp(combined), [[0.5, 0.5]], rtol=1e-6)
    mean_softmax = np.exp(transforms.tta_log_probs(logits, "flip-translate"))  # the other modes: mean softmax
    np.testing.assert_allclose(mean_softmax, jax.nn.softmax(logits, axis=-1).mean(0), rtol=1e-6)


def test_tta_final_only_evaluates_the_earlier_epochs_plain_and_the_last_with_the_views(tmp_path):
    """``--tta-final-only``: the same training; every epoch but the last gets the plain evaluation (the numbers
    of a run without --tta), the last one the TTA evaluation (the numbers of a run with --tta every epoch), and
    the history's ``tta`` key marks exactly that epoch."""
    from jaxcifar import fit
    from tests.tiny_runs import tiny_run

    def history(name: str, **changes) -> list[dict]:
        config = Config(**tiny_run(epochs=3, workdir=str(tmp_path / name), **changes))
        return fit(config, verbose=False).history

    plain, every, final_only = (
        history("plain"),
        history("every", tta="multi-crop"),
        history("final", tta="multi-crop", tta_final_only=True),
    )
    loss = [[record["test_loss"] for record in h] for h in (plain, every, final_only)]
    assert loss[2] == pytest.approx(loss[0][:2] + loss[1][2:], rel=1e-6, abs=0), loss
    assert loss[1][2] != pytest.approx(loss[0][2], rel=1e-4), loss  # the views change the numbers
    assert [record.get("tta") for record in final_only] == [None, None, "multi-crop"]
    assert [record.get("tta") for record in every] == ["multi-crop"] * 3
    # A TTA epoch also records its first view's numbers, the plain evaluation's; the best checkpoint is chosen on
    # them under --tta-final-only, so the last epoch is compared like with like.
    assert "test_plain_acc" not in final_only[0] and "test_plain_acc" not in plain[2]
    assert [r["test_plain_loss"] for r in every] == pytest.approx([r["test_loss"] for r in plain], rel=1e-5)
    assert [r["test_plain_acc"] for r in every] == pytest.approx([r["test_acc"] for r in plain], abs=1 / 64)
    plain_acc = [r["test_acc"] for r in final_only[:2]] + [final_only[2]["test_plain_acc"]]
    meta = RunDir(tmp_path / "final").read_meta()
    assert meta["best"] == max(plain_acc), (meta["best"], plain_acc, final_only[2]["test_acc"])
    best_steps = [int(p.name) for p in RunDir(tmp_path / "final").best.iterdir() if p.name.isdigit()]
    assert best_steps == [final_only[plain_acc.index(max(plain_acc))]["step"]], (best_steps, plain_acc)
    with pytest.raises(ConfigError, match=r"^--tta-final-only needs a --tta other than none$"):
        Config(tta_final_only=True)


def test_lookahead_by_hand():
    """every 2 steps, T = 4, decay 0.5: d(t) = 0.5 (t/4)^3. SGD lr 1 on the loss w (gradient 1): w drops by 1 a step."""
    spec = steps.Lookahead(every=2, decay=0.5, total_steps=4)
    slow_start = {"params": {"w": jnp.array(10.0)}, "batch_stats": {"m": jnp.array(0.0)}}
    state = TrainState.create(apply_fn=None, params={"w": jnp.array(10.0)}, tx=optax.sgd(1.0),
                              batch_stats={"m": jnp.array(0.0)}, rng=jax.random.PRNGKey(0),
                              lookahead=slow_start)  # fmt: skip
    fast, slow = 10.0, 10.0
    for t in range(1, 5):
        state = state.apply_gradients(grads={"w": jnp.array(1.0)}, batch_stats={"m": jnp.array(float(t))})
        state = steps.lookahead_update(state, spec)
        fast -= 1.0
        if t % 2 == 0:
            d = 0.5 * (t / 4) ** 3
            slow = d * slow + (1 - d) * fast
            fast = slow
        assert float(state.params["w"]) == pytest.approx(fast)
        assert float(state.lookahead["params"]["w"]) == pytest.approx(slow)
    # t=2: d=1/16, slow = 10/16 + 15/16 * 8 = 8.125; t=4: d=1/2, slow = (8.125 + 6.125) / 2
    assert slow == pytest.approx((8.125 + 6.125) / 2)
    assert float(state.lookahead["batch_stats"]["m"]) == pytest.approx(0.5 * (1 / 16 * 0 + 15 / 16 * 2) + 0.5 * 4)


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PRESETS = sorted(path.parent.name for path in EXPERIMENTS.glob("*/config.json"))


def test_the_named_presets_are_among_those_parsed():
    assert {"airbench94", "resnet9_24ep", "resnet18_onecycle_20ep", "resnet18_best"} <= set(PRESETS), PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_parse_as_the_cli_reads_them_and_flags_override(preset):
    from jaxcifar import cli
    from jaxcifar.train import build_parser

    path = EXPERIMENTS / preset / "config.json"
    config = cli.parse_config(build_parser(), ["--config", str(path), "--epochs", "2"])
    assert config == Config.load(path).replace(epochs=2)


@pytest.mark.torch
@pytest.mark.parametrize(("name", "frozen"), [("resnet9", 0), ("airbench", 2 * 2 * 3 * 24)])
def test_pytorch_twins_have_the_same_trainable_parameters(name, frozen):
    """The bench's PyTorch twins: the Flax model's parameter count, less the frozen whitening filters (Flax keeps
    them in params, frozen by the optimizer; the twin sets requires_grad False); same logits shape."""
    torch = torch_support.require("torch")
    from jaxcifar import torch_fast

    net = torch_fast.twin(name, width=8)
    flax_count = param_count(_abstract(models.get_model(name, width=8))["params"])
    assert torch_fast.trainable_parameter_count(net) == flax_count - frozen
    assert tuple(net(torch.zeros(2, 3, 32, 32)).shape) == (2, 10)
    with pytest.raises(ValueError, match="no PyTorch twin of 'resnet18'"):
        torch_fast.twin("resnet18")


def test_muon_orthogonalizes_the_conv_filter_updates_and_leaves_the_rest_to_sgd():
    """A kernel gradient whose (kh*kw*C_in, C_out) matrix has singular values 8, 4, 2, 1: Muon's first update has
    them all near muon_lr (3 Newton-Schulz steps bring these into about [0.7, 1.2] x muon_lr; a matrix 8x less
    even than the gradient); the head and the frozen whitening filters are not Muon's."""
    u, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3 * 3 * 8, 4)))
    v, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
    grad = (u * np.array([8.0, 4.0, 2.0, 1.0])) @ v.T
    params = {
        "group1": {"conv1": {"kernel": jnp.zeros((3, 3, 8, 4))}},
        "linear": {"kernel": jnp.zeros((4, 10))},
        "whiten": {"kernel": jnp.zeros((2, 2, 3, 24)), "bias": jnp.zeros(24)},
    }
    grads = {
        "group1": {"conv1": {"kernel": jnp.asarray(grad.reshape(3, 3, 8, 4), jnp.float32)}},
        "linear": {"kernel": jnp.ones((4, 10))},
        "whiten": {"kernel": jnp.ones((2, 2, 3, 24)), "bias": jnp.zeros(24)},
    }
    config = Config(model="airbench", muon_lr=0.24, lr=0.5, momentum=0.0, weight_decay=0.0)
    tx = optim.make_optimizer(config, optax.constant_schedule(0.5))
    updates, _ = tx.update(grads, tx.init(params), params)
    singular = np.linalg.svd(np.asarray(updates["group1"]["conv1"]["kernel"]).reshape(-1, 4), compute_uv=False)
    assert np.all((0.6 * 0.24 < singular) & (singular < 1.3 * 0.24)) and singular.max() / singular.min() < 2, singular
    np.testing.assert_allclose(updates["linear"]["kernel"], -0.5 * np.ones((4, 10)), rtol=1e-6)  # plain SGD
    np.testing.assert_array_equal(updates["whiten"]["kernel"], np.zeros((2, 2, 3, 24)))  # still frozen


def test_muon_normalize_rescales_each_kernel_to_norm_sqrt_c_out_before_the_step():
    """airbench94_muon's step ``p <- p * sqrt(C_out) / ||p||; p <- p - lr * U``: the new kernel equals the rescaled
    one plus the update of optax's Muon alone (--no-muon-normalize), for two steps (the momentum carried); the
    head is not touched by it."""
    rng = np.random.default_rng(0)
    params = {
        "group1": {"conv1": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 8, 4)), jnp.float32)}},
        "linear": {"kernel": jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)},
    }
    config = Config(model="airbench", muon_lr=0.24, lr=0.5, momentum=0.0, weight_decay=0.0)
    schedule = optax.constant_schedule(0.5)
    normalized, plain = (optim.make_optimizer(config.replace(muon_normalize=f), schedule) for f in (True, False))
    state_n, state_p = normalized.init(params), plain.init(params)
    for step in range(2):
        grads = jax.tree.map(lambda p, s=step: jnp.asarray(rng.normal(size=p.shape), jnp.float32) + s, params)
        updates_n, state_n = normalized.update(grads, state_n, params)
        updates_p, state_p = plain.update(grads, state_p, params)
        kernel = params["group1"]["conv1"]["kernel"]
        rescaled = kernel * 2.0 / np.linalg.norm(np.asarray(kernel))  # sqrt(C_out = 4) = 2
        new, moved = kernel + updates_n["group1"]["conv1"]["kernel"], rescaled + updates_p["group1"]["conv1"]["kernel"]
        chex.assert_trees_all_close(new, moved, atol=1e-6)
        chex.assert_trees_all_close(updates_n["linear"], updates_p["linear"])
        params = optax.apply_updates(params, updates_n)
    with pytest.raises(ValueError, match="needs the parameters"):
        optim.normalize_kernels().update(params, optax.EmptyState())
    for flags in (dict(muon_lr=0.24), dict(whiten_bias_decay=True)):
        with pytest.raises(ConfigError, match="needs a numeric --lr"):
            Config(model="airbench", lr="auto", **flags)
