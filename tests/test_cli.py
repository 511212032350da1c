"""The command line: every flag documented, bad input ends in one clear line and a non-zero exit."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcifar.config import Config, flag
from jaxcifar.train import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def run_main(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    return exit_info.value.code, err


def test_every_config_field_is_a_documented_flag_and_the_cli_reference_lists_it():
    help_text = build_parser().format_help()
    reference = (REPO / "docs" / "cli.md").read_text()
    for f in dataclasses.fields(Config):
        assert flag(f.name) in help_text
        assert f.metadata["help"].strip()
        assert f"`{flag(f.name)}" in reference, f"docs/cli.md does not describe {flag(f.name)}"


def test_defaults_reproduce_the_assignment_run():
    args = build_parser().parse_args([])
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    assert (config.model, config.epochs, config.optimizer, config.schedule) == ("resnet18", 20, "sgd", "onecycle")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "resnet50"], "--model: invalid choice: 'resnet50'"),
        (["--optimizer", "lamb"], "--optimizer: invalid choice"),
        (["--schedule", "step"], "--schedule: invalid choice"),
        (["--data-source", "s3"], "--data-source: invalid choice"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--batch-size", "-5"], "--batch-size must be >= 1"),
        (["--val-fraction", "1.0"], "--val-fraction must be in [0, 1)"),
        (["--val-fraction", "-0.1"], "--val-fraction must be in [0, 1)"),
        (["--epochs", "three"], "--epochs: invalid int value"),
        (["--num-devices", "-1"], "--num-devices must be >= 0"),
        (["--ema-decay", "1.0"], "--ema-decay must be in [0, 1)"),
        (["--mixup-alpha", "-0.2"], "--mixup-alpha must be >= 0"),
        (["--cutmix-alpha", "-1"], "--cutmix-alpha must be >= 0"),
        (["--mix-prob", "1.5"], "--mix-prob must be in [0, 1]"),
        (["--tta", "rotate"], "--tta: invalid choice: 'rotate'"),
        (["--lr", "fast"], "--lr/--max-lr: invalid value 'fast': a finite number or auto"),
        (["--cycle-momentum", "--schedule", "cosine"], "--cycle-momentum needs --schedule onecycle"),
    ],
)
def test_bad_flags(argv, expected, capsys, tmp_path):
    code, err = run_main([*argv, "--workdir", str(tmp_path / "w")], capsys)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w").exists()


def test_missing_and_empty_data_dir(capsys, tmp_path):
    code, err = run_main(
        ["--data-source", "folder", "--data-dir", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w")], capsys
    )
    assert code == 1 and "no such directory" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(
        ["--data-source", "folder", "--data-dir", str(empty), "--workdir", str(tmp_path / "w")], capsys
    )
    assert code == 1 and "missing train/ folder" in err
    assert not (tmp_path / "w").exists()


def test_more_devices_than_present(capsys, tmp_path):
    code, err = run_main(
        ["--data-source", "synthetic", "--num-devices", "64", "--workdir", str(tmp_path / "w")], capsys
    )
    assert code == 2 and "--num-devices 64: only" in err and len(err.strip().splitlines()) == 1


def test_too_few_steps_for_onecycle(capsys, tmp_path):
    argv = ["--data-source", "synthetic", "--train-subset", "64", "--batch-size", "64", "--epochs", "1"]
    code, err = run_main([*argv, "--workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and "--schedule onecycle needs more than 3 steps" in err and len(err.strip().splitlines()) == 1


def test_unreadable_image(capsys, tmp_path):
    from tests.test_data import write_folder

    write_folder(tmp_path / "data")
    (tmp_path / "data" / "test" / "dog" / "1.png").write_bytes(b"\x89PNG broken")
    code, err = run_main(
        ["--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "w"), "--batch-size", "4"], capsys
    )
    assert code == 1 and "dog/1.png: unreadable image" in err and len(err.strip().splitlines()) == 1


def test_resume_with_another_model_leaves_workdir_intact(synthetic_run, capsys):
    config, _ = synthetic_run
    snapshot = {p: p.read_bytes() for p in Path(config.workdir).rglob("*") if p.is_file()}
    code, err = run_main(
        ["--data-source", "synthetic", "--model", "resnet34", "--workdir", config.workdir, "--resume"], capsys
    )
    assert code == 2 and "the saved run differs in" in err and "--model resnet18 (saved) vs resnet34 (now)" in err
    assert {p: p.read_bytes() for p in Path(config.workdir).rglob("*") if p.is_file()} == snapshot


def test_subprocess_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxcifar.train", "--epochs", "-1", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "python -m jaxcifar.train: error: --epochs must be >= 1 (see --help)"
    assert "Traceback" not in result.stderr
