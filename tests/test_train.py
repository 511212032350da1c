"""The training loop end to end: learning, outputs, resume, real data."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcifar import CheckpointError, Config, ConfigError, backend, fit, load_dataset, loop, optim, steps
from jaxcifar.layout import RunDir
from jaxcifar.mesh import make_mesh
from jaxcifar.network import build_model
from jaxcifar.state import create_train_state

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
MEAN_CIFAR10, STD_CIFAR10 = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's channel statistics


def test_loss_goes_down_on_learnable_problem(synthetic_run):
    _, result = synthetic_run
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.history[-1]["test_acc"] > 0.5
    chex.assert_tree_all_finite(result.state.params)
    assert int(result.state.step) == 4 * (512 // 32)


def test_workdir_outputs(synthetic_run):
    config, result = synthetic_run
    workdir = Path(config.workdir)
    assert Config.load(workdir / "config.json") == config
    history = RunDir(workdir).read_history()
    assert history == result.history and len(history) == 4
    keys = {"epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr"} | set(loop.TIME_KEYS)
    assert set(history[0]) >= keys
    assert history[-1]["lr"] < history[1]["lr"]  # onecycle annealed
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [16, 32, 48, 64]
    assert len(list((workdir / "best").iterdir())) == 1
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_equals_uninterrupted_run(synthetic_run, tmp_path):
    """Cut the finished run back to epoch 2 (as a crash would) and resume it: same result."""
    config, full = synthetic_run
    workdir = tmp_path / "interrupted"
    shutil.copytree(config.workdir, workdir)
    for directory in ("checkpoints", "best"):
        for step_dir in (workdir / directory).iterdir():
            if int(step_dir.name) > 32:
                shutil.rmtree(step_dir)
    resumed = fit(config.replace(workdir=str(workdir), resume=True), verbose=False)
    assert int(resumed.state.step) == int(full.state.step)
    chex.assert_trees_all_close(resumed.state.params, full.state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(resumed.state.batch_stats, full.state.batch_stats, rtol=1e-5, atol=1e-6)
    strip = [{k: v for k, v in r.items() if k not in loop.TIME_KEYS} for r in resumed.history]
    expected = [{k: v for k, v in r.items() if k not in loop.TIME_KEYS} for r in full.history]
    assert [sorted(r) for r in strip] == [sorted(r) for r in expected]
    np.testing.assert_allclose(
        [[r[k] for k in sorted(r)] for r in strip], [[r[k] for k in sorted(r)] for r in expected], rtol=1e-5
    )


@pytest.mark.parametrize("entry", ["run", "fit"])
def test_existing_run_is_not_overwritten_without_resume(synthetic_run, entry):
    """``jaxcifar.run(config)`` then ``run``/``fit`` of the same config: refused, in the Python API's words."""
    import jaxcifar

    config, _ = synthetic_run
    before = sorted(str(p.relative_to(config.workdir)) for p in Path(config.workdir).rglob("*"))
    history = Path(config.workdir, "history.json").read_text()
    python = re.escape("already holds a run; pass --resume (in Python: config.replace(resume=True))")
    with pytest.raises(CheckpointError, match=python):
        getattr(jaxcifar, entry)(config, verbose=False)
    after = sorted(str(p.relative_to(config.workdir)) for p in Path(config.workdir).rglob("*"))
    assert before == after and Path(config.workdir, "history.json").read_text() == history


def test_resume_refuses_a_workdir_of_another_model(synthetic_run):
    config, _ = synthetic_run
    with pytest.raises(ConfigError, match=r"saved run differs in --model resnet18 \(saved\) vs resnet34 \(now\)"):
        fit(config.replace(model="resnet34", resume=True), verbose=False)


def test_one_epoch_on_real_shared_images(real_run):
    """One epoch on 400 real images learns little (8 steps), so the check is that the reported test numbers
    are those of the trained weights on the 200 test images, recomputed here with a plain forward."""
    config, result = real_run
    state, history = result.state, result.history
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    assert int(state.step) == 400 // 50
    assert jax.tree.leaves(state.params)[0].dtype == np.float32
    test = load_dataset(config).test
    chex.assert_shape(test.images, (200, 32, 32, 3))
    x = (np.asarray(test.images, np.float32) / 255 - np.float32(MEAN_CIFAR10)) / np.float32(STD_CIFAR10)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = np.asarray(jax.jit(lambda v, im: state.apply_fn(v, im, train=False))(variables, x), np.float64)
    top = logits.max(-1)
    nll = np.log(np.exp(logits - top[:, None]).sum(-1)) + top - logits[np.arange(200), test.labels]
    second = np.sort(logits, -1)[:, -2]
    assert (top - second).min() > 1e-4  # no near-tie whose argmax could flip between compilations
    assert history[0]["test_acc"] == pytest.approx(np.mean(logits.argmax(-1) == test.labels), abs=1e-6)  # float32
    assert history[0]["test_loss"] == pytest.approx(nll.mean(), rel=1e-5)


def test_chunked_evaluation_equals_one_forward():
    """``apply_in_chunks`` (eval on one CPU device) gives the whole batch's outputs and metrics; the
    chunk is the largest divisor of the batch up to the limit, or the whole batch when there is none."""
    config = Config(width=4, batch_size=32)
    tx = optim.make_optimizer(config, optax.constant_schedule(0.1))
    state = create_train_state(build_model(config), tx, seed=0)
    key = jax.random.PRNGKey(3)
    batch = {
        "image": jax.random.randint(key, (96, 32, 32, 3), 0, 256).astype(jnp.uint8),
        "label": jnp.arange(96) % 10,
        "mask": jnp.arange(96) < 90,
    }
    whole = jax.jit(lambda s, b: steps.eval_step(s, b, mean=MEAN, std=STD))(state, batch)
    chunked = jax.jit(lambda s, b: steps.eval_step(s, b, mean=MEAN, std=STD, chunk=40))(state, batch)  # 3 x 32
    chex.assert_trees_all_close(chunked, whole, rtol=1e-5)
    assert float(whole["count"]) == 90
    calls = []

    def record(x):
        calls.append(x.shape[0])
        return x

    for n, chunk, expected in ((96, 40, 32), (1000, 128, 125), (256, 128, 128), (97, 64, 97), (16, None, 16)):
        calls.clear()
        chex.assert_shape(jax.jit(lambda x, c=chunk: steps.apply_in_chunks(record, x, c))(jnp.zeros((n, 2))), (n, 2))
        assert calls == [expected], (n, chunk, calls)


def test_fit_evaluates_in_chunks_on_one_cpu_device():
    """``fit`` builds its eval step on a one-device mesh; on a CPU that step must run the forward in
    chunks (a ``lax.map`` loop in the compiled program), as docs/performance.md says."""
    if jax.devices()[0].platform != "cpu":
        pytest.skip("chunked evaluation is for CPU devices")
    mesh = make_mesh(1)
    assert backend.eval_chunk(list(mesh.devices.flat)) == backend.CPU_EVAL_CHUNK
    model = build_model(Config(width=4))
    state = create_train_state(model, optax.sgd(0.1), seed=0)
    batch = {
        "image": jnp.zeros((256, 32, 32, 3), jnp.uint8),
        "label": jnp.zeros((256,), jnp.int32),
        "mask": jnp.ones((256,), bool),
    }
    hlo = steps.make_eval_step(MEAN, STD, mesh=mesh).lower(state, batch).as_text()
    assert "while" in hlo  # the chunk loop; one forward of the whole batch has none


def _tiny_run(tmp_path: Path, **overrides):
    """A set-up run (``loop.set_up``) of a width-4 ResNet18 on 128 synthetic images and its initial state."""
    from jaxcifar import loop
    from jaxcifar.setup import RunSetup

    config = Config(
        data_source="synthetic", width=4, epochs=2, batch_size=32, eval_batch_size=64, train_subset=128,
        test_subset=64, lr=0.05, log_every=2, workdir=str(tmp_path / "run"), compile_cache=False, **overrides,
    )  # fmt: skip
    setup = RunSetup.create(config, verbose=False)
    tx, schedule = setup.training_optimizer()
    state = setup.initial_state(tx)
    run = loop.set_up(setup, state, [], schedule, RunDir(config.workdir), verbose=False)
    return run, state


def test_an_epoch_reads_no_scalar_back_from_the_device(tmp_path, monkeypatch):
    """No host syncs in the epoch loop: a scalar read of a device array (``int(state.step)``, ``float(loss)``)
    waits for every queued step. big_vision runs its loops under ``jax.transfer_guard("disallow")``, but on
    CPU a device->host read is no transfer and passes the guard, so here the scalar conversions of
    ``jax.Array`` raise instead; the explicit ``jax.device_get`` of the summed metrics at a progress refresh
    stays allowed."""
    from jax._src.array import ArrayImpl

    from jaxcifar import loop

    run, state = _tiny_run(tmp_path)

    def no_sync(*args, **kwargs):
        raise AssertionError("a scalar read of a device array inside the epoch loop (a host sync)")

    try:
        with monkeypatch.context() as guard:
            for name in ("__int__", "__float__", "__index__", "__bool__", "item"):
                guard.setattr(ArrayImpl, name, no_sync)
            state, record = loop.train_epoch(run, state, 1)
            state, record2 = loop.train_epoch(run, state, 2)
        assert record["step"] == 4 and record2["step"] == 8 == int(state.step)  # the host's count is the state's
        assert record2["lr"] == pytest.approx(float(run.schedule(7)))
    finally:
        run.writer.close()
        run.checkpointer.close()


def test_a_train_step_updates_the_batchnorm_statistics(tmp_path):
    """A frozen BatchNorm (statistics not carried out of the step) would still train; this catches it at once."""

    run, state = _tiny_run(tmp_path)
    try:
        before = jax.device_get(state.batch_stats)
        batch = run.setup.batch(run.setup.epoch_rows(1), 0)
        state, _ = run.train_step(state, batch)
        after = jax.device_get(state.batch_stats)
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
        assert all(jax.tree.leaves(changed)), changed  # every BatchNorm's mean and var moved
    finally:
        run.writer.close()
        run.checkpointer.close()
