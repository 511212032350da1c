"""python -m jaxcifar.bench: the JSON line, the FLOP count, bad flags. (Speed is never asserted.)"""

from __future__ import annotations

import json
import sys

import pytest

from jaxcifar import bench, models

TINY = ["--width", "4", "--batch-size", "8", "--steps", "1", "--warmup", "0"]
STEP_KEYS = {"images_per_s", "ms_per_step", "compile_s", "gflops_per_s", "min_ms", "cpu_ms_per_step"}


def test_tiny_run_ends_with_one_json_line(capsys):
    assert bench.main([*TINY, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "jax train" in "\n".join(out[:-1])  # the table comes first
    result = json.loads(out[-1])
    assert {"train", "eval", "device", "batch_size"} <= set(result)
    for part in ("train", "eval"):
        assert set(result[part]) == STEP_KEYS
        assert result[part]["images_per_s"] > 0 and result[part]["gflops_per_s"] > 0
        assert result[part]["compile_s"] >= 0
    assert result["batch_size"] == 8 and result["width"] == 4 and result["device"] == "cpu"
    assert result["conv_impl"].startswith(("lax", "matmul", "auto")) and "torch" not in result


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
