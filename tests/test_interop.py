"""jaxcifar.interop without PyTorch numerics: key layout, wrappers, errors, the report of a PyTorch checkpoint.

The key layout is checked against an independent transcription of kuangliu/pytorch-cifar's names
(``_kuangliu_numpy``) on NumPy arrays, so most of this runs without torch; the tests that write a
real ``.pth`` file need torch (skipped without it, failing when JAXCIFAR_REQUIRE_TORCH=1).
Numerical equivalence with PyTorch is in test_torch_equivalence.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxcifar import interop, models
from jaxcifar.errors import CheckpointError
from jaxcifar.report import TORCH_FIGURES, main
from tests.torch_support import require

REPO = Path(__file__).resolve().parents[1]


def _random_variables(name: str, seed: int = 0, **kwargs) -> dict:
    """{"params", "batch_stats"} of ``name`` filled with random float32 values (shapes by eval_shape, no compile)."""
    model = models.get_model(name, **kwargs)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(
        lambda key, im: model.init(key, im, train=False, mutable=["params", "batch_stats"]), jax.random.PRNGKey(0), x
    )
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), dict(shapes))


def _kuangliu_numpy(variables: dict) -> dict[str, np.ndarray]:
    """Independent transcription: jaxcifar variables -> kuangliu state_dict names and layouts (NumPy)."""
    out: dict[str, np.ndarray] = {}

    def module_name(flax_name: str) -> str:
        if flax_name.startswith("layer"):
            stage, block = flax_name.split("_")
            return f"{stage}.{block}"
        return {"shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}.get(flax_name, flax_name)

    def visit(tree: dict, prefix: list[str], collection: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                visit(value, [*prefix, module_name(key)], collection)
                continue
            name = ".".join(prefix)
            value = np.asarray(value)
            if key == "kernel":
                out[f"{name}.weight"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            elif key == "scale":
                out[f"{name}.weight"] = value
            elif key == "bias":
                out[f"{name}.bias"] = value
            elif key == "mean":
                out[f"{name}.running_mean"] = value
                out[f"{name}.num_batches_tracked"] = np.asarray(3)
            elif key == "var":
                out[f"{name}.running_var"] = value

    visit(variables["params"], [], "params")
    visit(variables["batch_stats"], [], "batch_stats")
    return out


def _assert_same_tree(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_load_numpy_state_dict_in_kuangliu_layout(name: str) -> None:
    variables = _random_variables(name, width=8)
    state_dict = _kuangliu_numpy(variables)
    assert "layer2.0.shortcut.0.weight" in state_dict and "layer1.0.shortcut.0.weight" not in state_dict
    assert state_dict["conv1.weight"].shape == (8, 3, 3, 3) and state_dict["linear.weight"].shape == (10, 64)
    loaded = interop.load_torch_state_dict(state_dict, name)
    _assert_same_tree(loaded, variables)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(loaded))
    # the model name and the width come from the keys and shapes when not given
    _assert_same_tree(interop.load_torch_state_dict(state_dict), variables)
    assert interop.infer_model_name(state_dict) == name


def test_wrapped_and_dataparallel_checkpoints() -> None:
    variables = _random_variables("resnet18", width=4, num_classes=100)
    state_dict = _kuangliu_numpy(variables)
    wrapped = {"net": {f"module.{k}": v for k, v in state_dict.items()}, "acc": 95.1, "epoch": 199}
    inner, meta = interop.unwrap_state_dict(wrapped)
    assert set(inner) == set(state_dict) and meta == {"acc": 95.1, "epoch": 199}
    _assert_same_tree(interop.load_torch_state_dict(wrapped, "resnet18"), variables)
    _assert_same_tree(interop.load_torch_state_dict({"state_dict": state_dict}), variables)


def test_mismatches_fail_with_one_line_listing_every_key() -> None:
    state_dict = _kuangliu_numpy(_random_variables("resnet18", width=8))
    del state_dict["layer3.1.bn2.running_var"]
    state_dict["layer1.0.conv3.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    state_dict["linear.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(CheckpointError) as error:
        interop.load_torch_state_dict(state_dict, "resnet18", num_classes=10)
    message = str(error.value)
    assert "\n" not in message
    assert "1 missing: layer3.1.bn2.running_var" in message
    assert "1 unexpected: layer1.0.conv3.weight" in message
    assert "linear.weight (100, 64) (expected (10, 64))" in message
    assert "resnet18(num_classes=10, width=8)" in message


def test_wrong_architecture_names_the_right_one() -> None:
    state_dict = _kuangliu_numpy(_random_variables("resnet34", width=4))
    with pytest.raises(CheckpointError, match=r"does not fit resnet18.*layer1\.2\.conv1\.weight.*look like resnet34"):
        interop.load_torch_state_dict(state_dict, "resnet18")
    with pytest.raises(CheckpointError, match="cannot tell the model"):
        interop.load_torch_state_dict({"conv1.weight": np.zeros((4, 3, 3, 3))})
    with pytest.raises(CheckpointError, match="unknown model"):
        interop.load_torch_state_dict(state_dict, "resnet50")
    with pytest.raises(CheckpointError, match="must be a state_dict"):
        interop.load_torch_state_dict([1, 2], "resnet18")  # type: ignore[arg-type]


def _malformed(change: str) -> dict:
    """A width-4 ResNet18 state_dict with one malformation (see test_malformed_state_dicts_fail_with_one_line)."""
    state_dict = _kuangliu_numpy(_random_variables("resnet18", width=4))
    if change == "int key":
        state_dict[1] = np.zeros(3, np.float32)
    elif change == "str value":
        state_dict["conv1.weight"] = "abc"
    elif change == "None value":
        state_dict["linear.weight"] = None
    elif change == "string array":
        state_dict["bn1.weight"] = np.array(["a"] * 4)
    elif change == "conv1 rank 1":
        state_dict["conv1.weight"] = np.zeros(4, np.float32)
    elif change == "linear scalar":
        state_dict["linear.weight"] = np.float32(1.0)
    elif change == "width 0":
        state_dict["conv1.weight"] = np.zeros((0, 3, 3, 3), np.float32)
    elif change == "classes 0":
        state_dict["linear.weight"] = np.zeros((0, 32), np.float32)
    return state_dict


@pytest.mark.parametrize(
    "change, message",
    [
        ("int key", r"keys must be parameter names \(str, e\.g\. 'conv1\.weight'\), got int 1$"),  # AttributeError
        ("str value", r"values must be tensors or arrays of real numbers: conv1\.weight is str$"),  # IndexError
        ("None value", r"values must be tensors or arrays of real numbers: linear\.weight is NoneType$"),  # IndexError
        ("string array", r"bn1\.weight is ndarray of <U1$"),  # ValueError from NumPy
        ("conv1 rank 1", r"conv1\.weight must have shape \(width, 3, 3, 3\) .* got \(4,\)$"),
        ("linear scalar", r"linear\.weight must have shape \(classes, features\) .* got \(\)$"),  # IndexError
        ("width 0", r"conv1\.weight must have shape \(width, 3, 3, 3\) .* got \(0, 3, 3, 3\)$"),  # ZeroDivisionError
        ("classes 0", r"linear\.weight must have shape \(classes, features\) .* got \(0, 32\)$"),  # ZeroDivisionError
    ],
)
def test_malformed_state_dicts_fail_with_one_line(change: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as error:
        interop.load_torch_state_dict(_malformed(change))
    assert "\n" not in str(error.value)


def test_empty_state_dict_and_bad_model_kwargs() -> None:
    for model_name in (None, "resnet18"):
        with pytest.raises(CheckpointError, match=r"state_dict is empty: expected kuangliu ResNet keys"):
            interop.load_torch_state_dict({}, model_name)
    state_dict = _kuangliu_numpy(_random_variables("resnet18", width=4))
    with pytest.raises(CheckpointError, match=r"width must be an integer >= 1, got 0"):
        interop.load_torch_state_dict(state_dict, "resnet18", width=0)  # ZeroDivisionError before
    with pytest.raises(CheckpointError, match=r"num_classes must be an integer >= 1, got 2\.5"):
        interop.load_torch_state_dict(state_dict, "resnet18", num_classes=2.5)


def test_core_never_imports_torch() -> None:
    code = (
        "import sys, jaxcifar, jaxcifar.interop, jaxcifar.report, jaxcifar.gradcam, jaxcifar.train, jaxcifar.models, "
        "jaxcifar.bench, jaxcifar.torch_resnet; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_reading_a_checkpoint_without_torch_says_how_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(CheckpointError, match=r"needs torch: pip install 'jaxcifar\[torch\]'"):
        interop.load_torch_checkpoint(tmp_path / "ckpt.pth")


@pytest.mark.torch
def test_unreadable_checkpoint_files(tmp_path) -> None:
    require("torch")
    with pytest.raises(CheckpointError, match="not found"):
        interop.load_torch_checkpoint(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read PyTorch checkpoint"):
        interop.load_torch_checkpoint(bad)


def _save_kuangliu_checkpoint(path: Path, name: str = "resnet18", width: int = 8) -> Path:
    """A kuangliu-style ckpt.pth of random weights (DataParallel prefix, acc, epoch)."""
    torch = require("torch")
    state_dict = _kuangliu_numpy(_random_variables(name, seed=1, width=width))
    for key in state_dict:
        if key.endswith("running_var"):
            state_dict[key] = np.abs(state_dict[key]) + 0.5
    net = {f"module.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    torch.save({"net": net, "acc": 12.5, "epoch": 3}, path)
    return path


@pytest.mark.torch
def test_report_cli_explains_a_pytorch_checkpoint(shared_data_dir, tmp_path, capsys) -> None:
    checkpoint = _save_kuangliu_checkpoint(tmp_path / "ckpt.pth")
    argv = ["--torch-checkpoint", str(checkpoint), "--data-dir", str(shared_data_dir), "--subset", "60", "--n", "4"]
    assert main(argv) == 0
    out_dir = tmp_path / "ckpt_report"  # the default: beside the checkpoint
    assert f"wrote {out_dir / 'gradcam.png'}" in capsys.readouterr().out
    for name in TORCH_FIGURES:
        image = np.asarray(Image.open(out_dir / f"{name}.png"))
        assert image.ndim == 3 and image.std() > 0, name
    assert not (out_dir / "curves.png").exists()
    summary = json.loads((out_dir / "report.json").read_text())
    assert summary["images"] == 60 and summary["layer"] == "layer3, 8x8"
    assert np.asarray(summary["confusion_matrix"]).sum() == 60
    assert summary["checkpoint"] == {
        "torch_checkpoint": str(checkpoint),
        "model": "resnet18",
        "width": 8,
        "epoch": 3,
        "acc": 12.5,
        "mean": list(interop.KUANGLIU_MEAN),
        "std": list(interop.KUANGLIU_STD),
    }


@pytest.mark.torch
def test_report_cli_torch_flag_errors(tmp_path, capsys) -> None:
    checkpoint = _save_kuangliu_checkpoint(tmp_path / "r34.pth", name="resnet34", width=4)
    cases = [
        (["--workdir", str(tmp_path), "--torch-checkpoint", str(checkpoint)], 2, "either --workdir or"),
        ([], 2, "either --workdir or --torch-checkpoint"),
        (["--workdir", str(tmp_path), "--model", "resnet18"], 2, "--model only go with --torch-checkpoint"),
        (["--torch-checkpoint", str(checkpoint), "--model", "resnet18"], 1, "look like resnet34"),
        (["--torch-checkpoint", str(tmp_path / "none.pth")], 1, "not found"),
        (["--torch-checkpoint", str(checkpoint), "--split", "val"], 2, "test or train"),
        (["--torch-checkpoint", str(checkpoint), "--std", "0.2", "0", "0.2"], 2, "--std needs 3 values"),
    ]
    for argv, code, text in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == code, argv
        assert text in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.torch
@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_torch_resnet_state_dict_has_the_layout_interop_converts(name: str) -> None:
    """jaxcifar.torch_resnet (the --compare-torch model, the equivalence tests' reference) has exactly the keys
    and shapes of the independent transcription above, in interop's order."""
    require("torch")
    from jaxcifar import torch_resnet

    state_dict = torch_resnet.make_resnet(name, width=4).state_dict()
    expected = _kuangliu_numpy(_random_variables(name, width=4))
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == {k: np.shape(v) for k, v in expected.items()}
    assert list(interop.to_torch_state_dict(interop.load_torch_state_dict(state_dict, name))) == list(state_dict)


@pytest.mark.torch
def test_torch_resnet_pools_globally_as_the_flax_model() -> None:
    """At 40x40 layer4 is 5x5: global pooling (both models) differs from kuangliu's avg_pool2d(out, 4)."""
    torch = require("torch")
    from jaxcifar import torch_resnet

    net = torch_resnet.make_resnet("resnet18", width=4, seed=2).eval()
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x).numpy()
    variables = interop.load_torch_state_dict(net.state_dict(), "resnet18")
    model = models.get_model("resnet18", width=4)
    logits = jax.jit(lambda v, im: model.apply(v, im, train=False))(
        variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    )
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-5)
