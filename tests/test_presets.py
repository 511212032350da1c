"""The presets in experiments/ run as the CLI would (``--config experiments/X/config.json``), shrunk to a tiny
synthetic problem: each learns, and airbench94's pieces hold in the finished run (whitening filters from the
training images and never trained, the run ending on Lookahead's slow weights, an exact resume, its report's
Grad-CAM layer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from jaxcifar import Config, fit
from jaxcifar.data import load_dataset
from jaxcifar.models.airbench import whitening_kernel
from jaxcifar.report import ReportOptions, make_report

REPO = Path(__file__).resolve().parents[1]
# Only the problem's size changes: the recipe (model, optimizer, schedule, augmentation, TTA) is the preset's.
TINY = dict(
    data_source="synthetic",
    width=4,
    train_subset=256,
    test_subset=128,
    batch_size=32,
    eval_batch_size=128,
    epochs=4,
    compile_cache=False,
    async_checkpoints=False,
    keep_checkpoints=4,
)


def _preset(name: str, tmp_path: Path, **changes) -> Config:
    preset = Config.load(REPO / "experiments" / name / "config.json")
    return preset.replace(**TINY, workdir=str(tmp_path / name), **changes)


def _airbench_preset(name: str, tmp_path: Path) -> Config:
    """The airbench preset ``name`` at TINY's size, its LR scaled to TINY's batch (airbench's LRs are per example:
    it sums the loss, so our per-batch LR scales with the batch) and the whitening bias trained for 1 epoch."""
    preset = Config.load(REPO / "experiments" / name / "config.json")
    return _preset(name, tmp_path, lr=preset.lr * TINY["batch_size"] / preset.batch_size, whiten_bias_epochs=1)


def _assert_whitening_from_the_data(state, dataset) -> None:
    """The run's whitening filters are those of its first 5,000 training images, never trained (an average of the
    constant filters, as Lookahead's, may round in the last bit)."""
    expected = whitening_kernel(dataset.train.images[:5000], dataset.mean, dataset.std)
    np.testing.assert_allclose(state.params["whiten"]["kernel"], expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_airbench94_preset_learns_with_its_whitening_frozen_and_ends_on_the_lookahead_weights(tmp_path):
    config = _airbench_preset("airbench94", tmp_path)
    dataset = load_dataset(config)
    state, history = fit(config, dataset, verbose=False)
    assert history[-1]["test_acc"] >= 0.45, [h["test_acc"] for h in history]
    _assert_whitening_from_the_data(state, dataset)
    jax.tree.map(np.testing.assert_array_equal, state.params, state.lookahead["params"])
    jax.tree.map(np.testing.assert_array_equal, state.batch_stats, state.lookahead["batch_stats"])
    # cut back to epoch 2 (as a crash would) and resume: the same run (Lookahead's slow weights, the optimizer
    # groups' state and the alternating flip's epoch all come back from the checkpoint)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(config.workdir, interrupted)
    for directory in ("checkpoints", "best"):
        for step_dir in (interrupted / directory).iterdir():
            if int(step_dir.name) > 2 * 8:
                shutil.rmtree(step_dir)
    resumed = fit(config.replace(workdir=str(interrupted), resume=True), dataset, verbose=False).state
    chex.assert_trees_all_close(resumed.params, state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(resumed.lookahead, state.lookahead, rtol=1e-5, atol=1e-6)
    # the report explains it at its own Grad-CAM layer, with the preset's TTA
    report = make_report(config.workdir, ReportOptions(n=2, tta=config.tta), config=config, dataset=dataset)
    assert (report.summary["layer"], report.summary["tta"]) == ("block2, 7x7", "multi-crop")


@pytest.mark.slow
def test_resnet9_preset_learns(tmp_path):
    config = _preset("resnet9_24ep", tmp_path, lr=0.4)  # the LR range test (lr auto) is tested elsewhere
    _, history = fit(config, verbose=False)
    assert history[-1]["test_acc"] >= 0.6, [h["test_acc"] for h in history]


@pytest.mark.slow
def test_airbench94_muon_preset_learns_with_its_kernels_kept_at_norm_sqrt_c_out(tmp_path):
    """airbench94_muon's run learns; every trained kernel ends at Frobenius norm ~sqrt(C_out) (Muon's steps
    rescale them before each update, and the last updates are small as the LR falls to 0); the whitening filters
    are the data's."""
    config = _airbench_preset("airbench94_muon", tmp_path)
    dataset = load_dataset(config)
    state, history = fit(config, dataset, verbose=False)
    assert history[-1]["test_acc"] >= 0.45, [h["test_acc"] for h in history]
    kernels = {
        f"{group}/{conv}": np.asarray(state.params[group][conv]["kernel"])
        for group in ("group1", "group2", "group3")
        for conv in ("conv1", "conv2")
    }
    for name, kernel in kernels.items():
        assert np.linalg.norm(kernel) == pytest.approx(np.sqrt(kernel.shape[-1]), rel=0.05), name
    _assert_whitening_from_the_data(state, dataset)
