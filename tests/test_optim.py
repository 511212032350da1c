"""Schedules against PyTorch's closed forms; optimizer composition."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcifar.config import Config
from jaxcifar.optim import make_optimizer, make_schedule, onecycle_schedule


def torch_onecycle(step, total, max_lr, pct_start=0.3, div=25.0, final_div=1e4):
    """PyTorch OneCycleLR (cos, two phases), written from its documented formula."""
    initial = max_lr / div
    minimum = initial / final_div
    peak = pct_start * total - 1
    end = total - 1

    def anneal(start, stop, pct):
        return stop + (start - stop) / 2.0 * (math.cos(math.pi * pct) + 1)

    if step <= peak:
        return anneal(initial, max_lr, step / peak)
    return anneal(max_lr, minimum, (step - peak) / (end - peak))


@pytest.mark.parametrize("total", [100, 391 * 20, 7])
def test_onecycle_matches_pytorch_closed_form(total):
    schedule = onecycle_schedule(total, max_lr=0.1)
    ours = np.asarray(jax.vmap(schedule)(jnp.arange(total)), np.float64)
    ref = np.array([torch_onecycle(s, total, 0.1) for s in range(total)])
    # float32 (optax, inside jit) vs float64 (PyTorch, on the host): cos(pi * pct) + 1 cancels near
    # the end of the cycle, so there the absolute error (1e-8 of max_lr) is the meaningful one.
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)
    assert ours[0] == pytest.approx(0.1 / 25, rel=1e-6)
    assert ours.max() == pytest.approx(ref.max(), rel=1e-5)
    if (0.3 * total).is_integer():  # the peak falls on a step: exactly max_lr there
        assert ours[round(0.3 * total) - 1] == pytest.approx(0.1, rel=1e-6)
    assert ours[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-4)


def test_other_schedules_shapes():
    spe = 10
    cfg = Config(epochs=20, lr=0.1)
    cosine = make_schedule(cfg.replace(schedule="cosine"), spe)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(200)) == pytest.approx(0.0, abs=1e-7)
    multistep = make_schedule(cfg.replace(schedule="multistep", milestones=(5, 15), gamma=0.1), spe)
    assert [float(multistep(s)) for s in (49, 50, 149, 150)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    warm = make_schedule(cfg.replace(schedule="warmup-cosine", warmup_epochs=2), spe)
    assert float(warm(0)) == 0.0 and float(warm(20)) == pytest.approx(0.1)
    assert float(make_schedule(cfg.replace(schedule="constant"), spe)(123)) == pytest.approx(0.1)


def test_sgd_weight_decay_is_coupled_like_pytorch():
    cfg = Config(optimizer="sgd", momentum=0.9, nesterov=False, weight_decay=0.1, schedule="constant", lr=0.5)
    tx = make_optimizer(cfg, optax.constant_schedule(0.5))
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    state = tx.init(params)
    buf = np.zeros(2)
    p = np.array([1.0, -2.0])
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        g = np.array([0.5, 0.5]) + 0.1 * p  # torch.optim.SGD: d_p = grad + wd * p
        buf = 0.9 * buf + g
        p = p - 0.5 * buf
        grads = {"w": jnp.array([0.5, 0.5])}
    chex.assert_trees_all_close(params["w"], jnp.asarray(p, jnp.float32), rtol=1e-6)


def test_adamw_decay_is_decoupled():
    cfg = Config(optimizer="adamw", weight_decay=0.1)
    tx = make_optimizer(cfg, optax.constant_schedule(0.01))
    params = {"w": jnp.array([1.0])}
    updates, _ = tx.update({"w": jnp.array([0.0])}, tx.init(params), params)
    # zero gradient: Adam's part is 0, only -lr * wd * p remains
    assert float(updates["w"][0]) == pytest.approx(-0.01 * 0.1 * 1.0)
