"""python -m jaxcifar.bench: the JSON line, the FLOP count, the peak table and MFU, --compare-torch (eager and
--torch-compile, on the CPU: no GPU here), bad flags. (Speed is never asserted.)"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import flax.linen as nn
import jax
import jaxlib
import numpy as np
import pytest

from jaxcifar import bench, measure, models, torch_bench, torch_resnet
from jaxcifar.config import Config
from jaxcifar.errors import DataError
from jaxcifar.sizing import param_count
from tests.torch_support import require

TINY = ["--width", "4", "--batch-size", "8", "--steps", "1", "--warmup", "0"]
STEP_KEYS = {"images_per_s", "ms_per_step", "compile_s", "gflops_per_s", "min_ms", "cpu_ms_per_step", "mfu"}
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


def test_tiny_run_ends_with_one_json_line_and_mfu_against_a_known_peak(monkeypatch, capsys):
    """With a peak for this runner's device kind (a fake table entry), MFU = the step's FLOPs / median time / peak."""
    first = jax.devices()[0]  # the bench runs on JAX's first device, whatever the runner has
    fake = measure.Peak("Fake chip", "^" + first.device_kind + "$", 1e12, None, 4e12, None, "float32", "a test")
    monkeypatch.setattr(measure, "PEAKS", (fake,))
    assert bench.main([*TINY, "--conv", "lax", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    table, result = "\n".join(out[:-1]), json.loads(out[-1])
    assert "jax train" in table  # the table comes first
    assert {"train", "eval", "device", "batch_size"} <= set(result)
    assert result["peak"] == {"flops_per_s": 1e12, "basis": "Fake chip, dense FP32 peak 1 TFLOP/s; a test"}
    for part in ("train", "eval"):
        r = result[part]
        assert set(r) == STEP_KEYS
        assert r["images_per_s"] > 0 and r["gflops_per_s"] > 0 and r["compile_s"] >= 0
        expected = result["flops_per_step"][part] / (r["ms_per_step"] / 1e3) / 1e12
        assert r["mfu"] == pytest.approx(expected, rel=1e-3)
        assert r["mfu"] == pytest.approx(r["gflops_per_s"] / 1e3, rel=1e-3)  # GFLOP/s / (1e12 / 1e9)
        assert f"{100 * r['mfu']:.1f}%" in table
    assert result["batch_size"] == 8 and result["width"] == 4
    assert result["device"] == jax.default_backend() == first.platform
    assert result["device_kind"] == first.device_kind and result["device_count"] == jax.device_count()
    assert result["conv_impl"] == "lax" and "torch" not in result  # what --conv asked for, not the default
    assert result["versions"]["jax"] == jax.__version__ and result["versions"]["jaxlib"] == jaxlib.__version__
    assert {"python", "flax", "numpy"} <= set(result["versions"]) and "torch" not in result["versions"]
    assert result["platform_version"] and result["augment"] == "crop-flip"
    assert f"jax {jax.__version__}, jaxlib {jaxlib.__version__}" in table


@pytest.mark.parametrize(
    ("device_kind", "name", "float32", "bfloat16", "float16"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 494.5e12, 989.5e12, 989.5e12),  # float32: TF32 dense
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 378e12, 756.5e12, 756.5e12),
        ("NVIDIA H100 NVL", "NVIDIA H100 NVL", 417.5e12, 835.5e12, 835.5e12),
        ("NVIDIA H200", "NVIDIA H200 SXM", 494.5e12, 989.5e12, 989.5e12),
        ("NVIDIA H200 NVL", "NVIDIA H200 NVL", 417.5e12, 835.5e12, 835.5e12),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 156e12, 312e12, 312e12),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100", 156e12, 312e12, 312e12),
        ("NVIDIA L4", "NVIDIA L4", 60e12, 121e12, 121e12),
        ("Tesla T4", "NVIDIA T4", 8.1e12, None, 65e12),  # float32: FP32 (no TF32), no bfloat16 tensor cores
        ("Tesla V100-SXM2-16GB", "NVIDIA V100 SXM2", 15.7e12, None, 125e12),
        ("Tesla V100-PCIE-32GB", "NVIDIA V100 PCIe", 14e12, None, 112e12),
        ("Tesla V100S-PCIE-32GB", "NVIDIA V100S PCIe", 16.4e12, None, 130e12),
        ("TPU v4", "TPU v4", 275e12, 275e12, None),  # float32: one bfloat16 pass at JAX's default precision
        ("TPU v5 lite", "TPU v5e", 197e12, 197e12, None),
        ("TPU v5", "TPU v5p", 459e12, 459e12, None),
        ("TPU v5p", "TPU v5p", 459e12, 459e12, None),
        ("TPU v6 lite", "TPU v6e", 918e12, 918e12, None),
    ],
)
def test_peak_table_matches_device_kinds_to_dense_datasheet_peaks(device_kind, name, float32, bfloat16, float16):
    assert measure.find_peak(device_kind).name == name
    assert measure.find_peak(device_kind.lower()).name == name  # case-insensitive
    for dtype, value in (("float32", float32), ("bfloat16", bfloat16), ("float16", float16)):
        peak = measure.peak_flops(device_kind, dtype)
        if value is None:
            assert peak["flops_per_s"] is None and peak["basis"].startswith(f"unknown: {name} has no {dtype} peak")
        else:
            assert peak["flops_per_s"] == pytest.approx(value) and peak["basis"].startswith(f"{name}, dense ")


@pytest.mark.parametrize("device_kind", ["cpu", "NVIDIA L40S", "NVIDIA GH200 480GB", "TPU v4 lite", "Radeon", ""])
def test_peak_is_unknown_for_devices_outside_the_table(device_kind):
    assert measure.find_peak(device_kind) is None
    assert measure.peak_flops(device_kind, "float32") == {
        "flops_per_s": None,
        "basis": f"unknown: no peak known for device kind {device_kind!r}",
    }
    assert measure.mfu(10**9, 5.0, None) is None


def test_a_mig_slice_has_no_known_peak():
    """A MIG instance reports its parent's name plus the slice; the whole chip's peak would understate MFU."""
    peak = measure.peak_flops("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "bfloat16")
    assert peak["flops_per_s"] is None and "MIG slice" in peak["basis"]


def test_full_float32_uses_the_fp32_peak_where_there_is_one():
    h100 = measure.peak_flops("NVIDIA H100 80GB HBM3", "float32", full_float32=True)
    assert h100["flops_per_s"] == 67e12 and "dense FP32 peak 67 TFLOP/s" in h100["basis"]
    assert "TF32 tensor core peak 494.5" in measure.peak_flops("NVIDIA H100 80GB HBM3", "float32")["basis"]
    assert measure.peak_flops("TPU v4", "float32", full_float32=True)["flops_per_s"] is None  # multi-pass: no figure
    assert measure.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16", full_float32=True)["flops_per_s"] == 989.5e12


def test_mfu_is_achieved_flops_over_peak():
    # 2 GFLOP in 4 ms = 500 GFLOP/s; on a 1 TFLOP/s device that is half of the peak
    assert measure.mfu(2 * 10**9, 4.0, 1e12) == pytest.approx(0.5)
    # ResNet18 train step at batch 512 (1.704 TFLOP) in 13.514 ms on an H200, float32 (TF32 494.5 TFLOP/s)
    h200 = measure.peak_flops("NVIDIA H200", "float32")["flops_per_s"]
    assert measure.mfu(1_704_446_656_512, 13.514, h200) == pytest.approx(126.124e12 / 494.5e12, rel=1e-4)
    summary = measure.summary({"ms_per_step": 4.0, "min_ms": 3.0, "cpu_ms_per_step": 8.0}, 16, 2 * 10**9, None, 1e12)
    assert summary["mfu"] == 0.5 and summary["gflops_per_s"] == 500.0 and summary["images_per_s"] == 4000.0


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
    forward, train = measure.count_flops(_Tiny(), batch_size=3)
    assert forward == 2 * 3 * macs
    assert train == 3 * forward - 2 * 3 * 16 * 16 * 27 * 4  # no input gradient of the first conv


def test_resnet18_flops_match_a_hand_count():
    """Multiply-adds of CIFAR ResNet18 per 32x32 image: stem 32*32*27*64, layer1 4 x 32*32*576*64,
    then per stage (stride-2 conv + 1x1 shortcut + 3 convs) 3 x 134,217,728, dense 512*10."""
    macs = 32 * 32 * 27 * 64 + 4 * 32 * 32 * 576 * 64 + 3 * 134_217_728 + 512 * 10
    assert macs == 555_422_720
    forward, train = measure.count_flops(models.get_model("resnet18"), batch_size=2)
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
        (["--dtype", "int8"], "--dtype"),
        (["--model", "resnet50"], "--model"),
        (["--width", "four"], "--width"),
        (["--torch-compile"], "--torch-compile"),  # only with --compare-torch
        (["--torch-device", "cpu"], "--torch-device"),
        (["--compare-torch", "--torch-device", "tpu"], "--torch-device"),
    ],
)
def test_bad_flags_end_with_one_line_and_exit_code_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and err[0].startswith(bench.PROG)


@pytest.mark.torch
def test_tiny_compare_torch_run_times_the_same_architecture(monkeypatch, capsys):
    torch = require("torch")
    built = []

    def recording_resnet(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    original = torch_resnet.resnet
    monkeypatch.setattr(torch_resnet, "resnet", recording_resnet)
    monkeypatch.delenv(PREALLOCATE, raising=False)  # main sets it; monkeypatch restores it afterwards
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
        if jax.devices()[0].platform == "cpu":  # no peak for a CPU: no MFU on either side
            assert result[part]["mfu"] is None and measured[part]["mfu"] is None
    formats = {measured["memory_format"], measured["other_format"]["memory_format"]}
    assert formats == {"channels_last", "contiguous"}
    assert measured["version"] == torch.__version__ and measured["threads"] == result["threads"]
    assert result["versions"]["torch"] == torch.__version__ and f"torch {torch.__version__} eager" in table
    assert measured["steps"] == torch_bench.TORCH_STEPS and measured["compile"] is None and measured["autocast"] is None
    assert result["xla_python_client_preallocate"] == "false"  # JAX leaves GPU memory to PyTorch
    if not torch.cuda.is_available():  # here: the CPU, with no CUDA details
        assert measured["device"] == "cpu" and measured["device_name"] == "cpu"
        assert measured["cuda"] is None and measured["cudnn"] is None and measured["tf32"] is None
        assert measured["peak"]["flops_per_s"] is None and measured["peak"]["basis"].startswith("unknown:")
    # one PyTorch model per memory format, each the jax model's architecture at --width 4
    jax_params = param_count(models.get_model("resnet18", width=4))  # by jax.eval_shape
    assert len(built) == 2
    for net in built:
        assert sum(p.numel() for p in net.parameters()) == jax_params
        assert net.linear.out_features == measure.NUM_CLASSES and net.conv1.out_channels == 4


def test_model_flags_are_trainings_and_a_config_file_sets_them(tmp_path, capsys):
    """--model, --width, --batch-size, --dtype and --conv-impl come from cli.add_config_flags (Config's help and
    choices); the bench's --batch-size default stays 128; --config takes them from a run's config.json and
    flags override it; the old spelling --conv still works (argparse's unique prefix of --conv-impl)."""
    spec, args = bench.parse_spec(bench.build_parser(), [])
    assert spec == measure.BenchSpec() and spec.batch_size == 128 and not args.json
    assert spec.config() == Config(batch_size=128, eval_batch_size=128, augment="crop-flip")
    path = tmp_path / "config.json"
    Config(model="resnet9", width=8, batch_size=64, dtype="bfloat16", conv_impl="lax", epochs=3).save(path)
    spec, _ = bench.parse_spec(bench.build_parser(), ["--config", str(path), "--width", "4", "--steps", "2"])
    assert spec == measure.BenchSpec(
        model="resnet9", width=4, batch_size=64, dtype="bfloat16", conv_impl="lax", steps=2
    )
    assert bench.parse_spec(bench.build_parser(), ["--conv", "matmul"])[0].conv_impl == "matmul"
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name in bench.CONFIG_FLAGS:
        assert " ".join(Config.__dataclass_fields__[name].metadata["help"].split()) in shown, name


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
    for flag in ("--compare-torch", "--torch-device", "--torch-compile"):
        assert flag in out


def _fake_torch(cuda: bool) -> SimpleNamespace:
    return SimpleNamespace(
        cuda=SimpleNamespace(is_available=lambda: cuda, current_device=lambda: 3),
        device=lambda kind, index=None: (kind, index),
    )


@pytest.mark.parametrize(
    ("requested", "cuda", "jax_platform", "expected"),
    [
        ("auto", True, "gpu", ("cuda", 3)),  # both on the GPU
        ("auto", True, "cpu", ("cpu", None)),  # JAX on the CPU (e.g. jax without CUDA): PyTorch too
        ("auto", False, "gpu", ("cpu", None)),  # a CPU-only PyTorch: the table warns that the devices differ
        ("auto", False, "cpu", ("cpu", None)),
        ("cpu", True, "gpu", ("cpu", None)),
        ("cuda", True, "cpu", ("cuda", 3)),
    ],
)
def test_torch_runs_on_cuda_when_jax_runs_on_a_gpu_and_torch_has_cuda(requested, cuda, jax_platform, expected):
    assert torch_bench.select_torch_device(_fake_torch(cuda), requested, jax_platform) == expected


@pytest.mark.torch
def test_torch_device_cuda_without_cuda_is_one_clear_error(capsys):
    with pytest.raises(DataError, match=r"^--torch-device cuda: torch.cuda.is_available\(\) is False"):
        torch_bench.select_torch_device(_fake_torch(False), "cuda", "gpu")
    torch = require("torch")
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit) as exc:  # before anything is timed
        bench.main([*TINY, "--compare-torch", "--torch-device", "cuda"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{bench.PROG}: error: --torch-device cuda: ")


@pytest.mark.torch
def test_torch_crop_flip_matches_a_numpy_crop_then_mirror():
    torch = require("torch")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    offsets = np.array([[0, 0], [8, 8], [3, 5], [0, 8], [8, 0], [4, 4]])
    flip = np.array([False, True, True, False, True, False])
    out = torch_bench.torch_crop_flip(
        torch, torch.from_numpy(images), torch.from_numpy(offsets), torch.from_numpy(flip)
    )
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))  # zero padding, as transforms.random_crop
    for i, ((dy, dx), mirrored) in enumerate(zip(offsets, flip, strict=True)):
        expected = padded[i, dy : dy + 5, dx : dx + 7]
        expected = expected[:, ::-1] if mirrored else expected  # transforms.augment: crop, then flip
        np.testing.assert_array_equal(out[i].numpy(), expected)
    assert out.dtype == torch.uint8 and tuple(out.shape) == images.shape


def test_warm_up_repeats_calls_until_one_compiles_nothing_new():
    compiled, calls = [0], []

    def run():  # compiles on its first two calls (e.g. a recompile on the second), then runs compiled
        calls.append(1)
        if len(calls) <= 2:
            compiled[0] += 1

    assert torch_bench.warm_up_compiled(run, lambda: compiled[0]) == 3 and len(calls) == 3
    assert torch_bench.warm_up_compiled(run, lambda: compiled[0]) == 1  # nothing left to compile
    assert torch_bench.warm_up_compiled(run, lambda: None) == 1  # no counter: one call
    forever = []  # compiles on every call: stops at max_calls
    assert torch_bench.warm_up_compiled(lambda: forever.append(1), lambda: len(forever), max_calls=4) == 4


def _fake_jax_side(monkeypatch):
    """The jax side of the bench replaced by fixed numbers: the tests below time PyTorch only."""
    part = {"images_per_s": 100.0, "ms_per_step": 80.0, "compile_s": 1.0, "gflops_per_s": 1.0}
    part |= {"min_ms": 80.0, "cpu_ms_per_step": 80.0, "mfu": None}
    monkeypatch.setattr(
        bench, "bench_jax", lambda *a, **k: {"train": part, "eval": part, "flops_per_step": {"train": 8, "eval": 3}}
    )


def _tiny_torch_net(*args, **kwargs):
    """A conv-BN-ReLU-pool-linear net: compiles in seconds on the CPU, where ResNet18 takes minutes."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, measure.NUM_CLASSES),
    )


@pytest.mark.torch
@pytest.mark.slow
def test_torch_compile_reports_compile_time_apart_from_the_timed_steps(monkeypatch, capsys):
    torch = require("torch")
    _fake_jax_side(monkeypatch)
    monkeypatch.setattr(torch_resnet, "resnet", _tiny_torch_net)
    monkeypatch.delenv(PREALLOCATE, raising=False)
    compiled = []
    original = torch.compile

    def recording_compile(model, *args, **kwargs):
        compiled.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    assert bench.main([*TINY, "--compare-torch", "--torch-compile", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    table, measured = "\n".join(out[:-1]), json.loads(out[-1])["torch"]
    assert len(compiled) == 1 and measured["memory_format"] == "channels_last" and measured["other_format"] is None
    for part in ("train", "eval"):
        assert measured[part]["compile_s"] > 0 and measured[part]["images_per_s"] > 0
    assert measured["compile"]["mode"] == "default" and measured["compile"]["recompiled_while_timing"] is False
    assert f"torch {torch.__version__} torch.compile" in table and "warning" not in table


@pytest.mark.torch
def test_torch_compile_failure_is_one_clear_line(monkeypatch, capsys):
    torch = require("torch")
    _fake_jax_side(monkeypatch)
    monkeypatch.setattr(torch_resnet, "resnet", _tiny_torch_net)
    monkeypatch.delenv(PREALLOCATE, raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no working C compiler found\n(traceback lines)")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: broken)
    with pytest.raises(SystemExit) as exc:
        bench.main([*TINY, "--compare-torch", "--torch-compile"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"{bench.PROG}: error: --torch-compile: torch.compile failed on cpu: "
        "RuntimeError: InductorError: no working C compiler found"
    ]


@pytest.mark.torch
@pytest.mark.parametrize(("dtype", "scaling"), [("bfloat16", None), ("float16", "torch.amp.GradScaler")])
def test_torch_half_precision_runs_under_autocast(dtype, scaling, monkeypatch, capsys):
    """The same code path as on CUDA (the device is a variable): autocast, and float16's loss scaling."""
    require("torch")
    _fake_jax_side(monkeypatch)
    monkeypatch.setattr(torch_resnet, "resnet", _tiny_torch_net)
    monkeypatch.delenv(PREALLOCATE, raising=False)
    assert bench.main([*TINY, "--dtype", dtype, "--compare-torch", "--torch-device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    measured = json.loads(out[-1])["torch"]
    assert measured["autocast"] == dtype and measured["loss_scaling"] == scaling and measured["device"] == "cpu"
    assert measured["train"]["images_per_s"] > 0 and measured["eval"]["images_per_s"] > 0
    assert f"{dtype} autocast" in "\n".join(out[:-1])
