"""The command line: every flag documented, bad input ends in one clear line and a non-zero exit."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcifar.cli import config_to_argv, parse_config
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


def _candidates(f: dataclasses.Field) -> list:
    """Values other than the default to try for a Config field (the caller drops those Config refuses)."""
    kind = str(f.type)
    if "choices" in f.metadata:
        return [c for c in f.metadata["choices"] if c != f.default]
    if kind == "bool":
        return [not f.default]
    if kind.startswith("tuple"):
        return [(1,), (2, 4), (3, 5, 7), (1, 64)]
    values: list = []
    if "str" in kind:  # workdir, data_dir, lr ("auto")
        values += ["runs/a b", "-starts-with-a-dash", "ünï/çødé", "auto"]
    if "float" in kind:
        base = 0.5 if f.default is None else f.default
        values += [base + 0.25, base / 3, 0.0, 1e-7, 1.0, 0.999, 123.456, 2.5e10]
    if "int" in kind:
        base = f.default or 1
        values += [base + 1, base * 3, 0, 1, 7, 2**32 - 1]
    return [v for v in values if v != f.default]


def _valid(**changes) -> Config | None:
    try:
        return Config(**changes)
    except ValueError:
        return None


FIELD_VALUES = {
    f.name: [c for v in _candidates(f) if (c := _valid(**{f.name: v})) is not None] for f in dataclasses.fields(Config)
}

# The fields whose other values need another field changed too (folder needs --data-dir, --tta-final-only a --tta).
DEFAULT = Config()
NEEDS_A_COMPANION = {
    "data_source": [Config(data_source="folder", data_dir="data")],
    "tta_final_only": [Config(tta="flip", tta_final_only=True)],
}


@pytest.mark.parametrize("name", list(FIELD_VALUES))
def test_config_to_argv_round_trips_every_value_of_every_field(name):
    """``parse_config(config_to_argv(c)) == c`` for configs that differ from the defaults in one field, over
    booleans, tuples, floats (1e-07, 1/3, 2.5e10), None, choices, ``auto`` and a workdir that starts with a dash;
    the argv holds that field's flag only (and its companion's, for ``NEEDS_A_COMPANION``)."""
    configs = FIELD_VALUES[name] + NEEDS_A_COMPANION.get(name, [])
    assert configs, f"no valid non-default value tried for {name}"
    for config in configs:
        argv = config_to_argv(config)
        assert parse_config(build_parser(), argv) == config, argv
        flags = [a.split("=")[0] for a in argv if a.startswith("--")]
        changed = [f.name for f in dataclasses.fields(Config) if getattr(config, f.name) != getattr(DEFAULT, f.name)]
        assert name in changed and len(changed) <= 2, changed
        assert sorted(f.replace("--no-", "--", 1) for f in flags) == sorted(flag(n) for n in changed), argv


def test_config_to_argv_round_trips_a_config_that_changes_every_field_at_once():
    config = Config()
    for name, configs in FIELD_VALUES.items():
        for value in [getattr(c, name) for c in configs]:  # the last one that fits with the others stays
            config = _valid(**{**config.to_dict(), name: value}) or config
    changed = [f.name for f in dataclasses.fields(Config) if getattr(config, f.name) != f.default]
    assert len(changed) > 0.9 * len(FIELD_VALUES), changed  # (a few need companions: e.g. cycle_momentum)
    argv = config_to_argv(config)
    assert parse_config(build_parser(), argv) == config
    assert [a.split("=")[0] for a in argv if a.startswith("--")] == [
        flag(n).replace("--", "--no-") if getattr(config, n) is False else flag(n) for n in changed
    ]


def test_config_to_argv_of_the_defaults_is_empty_and_refuses_what_no_flag_spells():
    assert config_to_argv(Config()) == []
    with pytest.raises(ValueError, match="--milestones: \\(\\) has no command-line spelling"):
        config_to_argv(Config(milestones=()))
