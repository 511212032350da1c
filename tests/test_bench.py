"""python -m jaxcifar.bench: the JSON line, the FLOP count, --compare-torch, bad flags. (Speed is never asserted.)"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import flax.linen as nn
import jax
import pytest

from jaxcifar import bench, models, torch_resnet
from jaxcifar.sizing import param_count
from tests.torch_support import require

TINY = ["--width", "4", "--batch-size", "8", "--steps", "1", "--warmup", "0"]
STEP_KEYS = {"images_per_s", "ms_per_step", "compile_s", "gflops_per_s", "min_ms", "cpu_ms_per_step"}


def test_tiny_run_ends_with_one_json_line(capsys):
    assert bench.main([*TINY, "--conv", "lax", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "jax train" in "\n".join(out[:-1])  # the table comes first
    result = json.loads(out[-1])
    assert {"train", "eval", "device", "batch_size"} <= set(result)
    for part in ("train", "eval"):
        assert set(result[part]) == STEP_KEYS
        assert result[part]["images_per_s"] > 0 and result[part]["gflops_per_s"] > 0
        assert result[part]["compile_s"] >= 0
    assert result["batch_size"] == 8 and result["width"] == 4
    first = jax.devices()[0]  # the bench runs on JAX's first device, whatever the runner has
    assert result["device"] == jax.default_backend() == first.platform
    assert result["device_kind"] == first.device_kind and result["device_count"] == jax.device_count()
    assert result["conv_impl"] == "lax" and "torch" not in result  # what --conv asked for, not the default


def test_describe_devices_reports_the_first_device_and_counts_them_all():
    gpus = [SimpleNamespace(platform="gpu", device_kind=f"NVIDIA H100 #{i}") for i in range(3)]
    assert bench.describe_devices(gpus) == {"device": "gpu", "device_kind": "NVIDIA H100 #0", "device_count": 3}


class _Tiny(nn.Module):
    """A strided 3x3, a grouped 1x1 and a VALID 2x3 convolution, then a Dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=2, padding=1)(x)  # 32x32x3 -> 16x16x4
        x = nn.Conv(6, (1, 1), feature_group_count=2)(x)  # -> 16x16x6, each output sees 4 / 2 inputs
        x = nn.Conv(5, (2, 3), padding="VALID")(x)  # -> 15x14x5
        return nn.Dense(10)(x.mean(axis=(1, 2)))  # 5 -> 10


def test_tiny_model_flops_match_a_hand_count():
    """Multiply-adds per image: 16*16*27*4 + 16*16*2*6 + 15*14*(2*3*6)*5 + 5*10."""
    macs = 16 * 16 * 27 * 4 + 16 * 16 * 2 * 6 + 15 * 14 * 36 * 5 + 5 * 10
    assert macs == 68_570
    forward, train = bench.count_flops(_Tiny(), batch_size=3)
    assert forward == 2 * 3 * macs
    assert train == 3 * forward - 2 * 3 * 16 * 16 * 27 * 4  # no input gradient of the first conv


def test_resnet18_flops_match_a_hand_count():
    """Multiply-adds of CIFAR ResNet18 per 32x32 image: stem 32*32*27*64, layer1 4 x 32*32*576*64,
    then per stage (stride-2 conv + 1x1 shortcut + 3 convs) 3 x 134,217,728, dense 512*10."""
    macs = 32 * 32 * 27 * 64 + 4 * 32 * 32 * 576 * 64 + 3 * 134_217_728 + 512 * 10
    assert macs == 555_422_720
    forward, train = bench.count_flops(models.get_model("resnet18"), batch_size=2)
    assert forward == 2 * 2 * macs
    assert train == 3 * forward - 2 * 2 * 32 * 32 * 27 * 64  # no input gradient of the first conv


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--width", "0"], "--width"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--steps", "0"], "--steps"),
        (["--warmup", "-2"], "--warmup"),
        (["--conv", "cudnn"], "--conv"),
        (["--dtype", "float16"], "--dtype"),
        (["--model", "resnet50"], "--model"),
        (["--width", "four"], "--width"),
    ],
)
def test_bad_flags_end_with_one_line_and_exit_code_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and err[0].startswith(bench.PROG)


def test_tiny_compare_torch_run_times_the_same_architecture(monkeypatch, capsys):
    torch = require("torch")
    built = []

    def recording_resnet(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    original = torch_resnet.resnet
    monkeypatch.setattr(torch_resnet, "resnet", recording_resnet)
    assert bench.main([*TINY, "--compare-torch", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    table, result = "\n".join(out[:-1]), json.loads(out[-1])
    assert "torch train" in table and "torch eval" in table and "jax / torch images/s" in table
    measured = result["torch"]
    for part in ("train", "eval"):
        assert set(measured[part]) == STEP_KEYS and measured[part]["compile_s"] is None
        assert measured[part]["images_per_s"] > 0 and measured[part]["gflops_per_s"] > 0
        ratio = result[part]["images_per_s"] / measured[part]["images_per_s"]
        assert result["ratio_vs_torch"][part] == pytest.approx(ratio, rel=1e-3, abs=1e-3)
    formats = {measured["memory_format"], measured["other_format"]["memory_format"]}
    assert formats == {"channels_last", "contiguous"}
    assert measured["version"] == torch.__version__ and measured["threads"] == result["threads"]
    # one PyTorch model per memory format, each the jax model's architecture at --width 4
    jax_params = param_count(models.get_model("resnet18", width=4))  # by jax.eval_shape
    assert len(built) == 2
    for net in built:
        assert sum(p.numel() for p in net.parameters()) == jax_params
        assert net.linear.out_features == bench.NUM_CLASSES and net.conv1.out_channels == 4


def test_compare_torch_without_torch_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(SystemExit) as exc:
        bench.main([*TINY, "--compare-torch"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{bench.PROG}: error: --compare-torch needs PyTorch: pip install torch"]


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--width", "--batch-size", "--dtype", "--conv", "--steps", "--warmup", "--json"):
        assert flag in out
    assert "--compare-torch" in out
