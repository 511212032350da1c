"""Builds argparse flags from the Config dataclass and reports user errors as one line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from jaxcifar.config import Config, flag


class ArgumentParser(argparse.ArgumentParser):
    """argparse that ends a bad command line with one error line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_config_flags(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """Adds ``--config JSON`` and one flag per Config field (help, default and choices from the
    field's metadata); ``parse_config`` reads them."""
    parser.add_argument(
        "--config",
        metavar="JSON",
        help="Start from this config file (e.g. experiments/cpu_quick/config.json or a run's config.json); "
        "flags given on the command line override its values.",
    )
    for f in dataclasses.fields(Config):
        if f.name in exclude:
            continue
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "dest": f.name}
        annotation = str(f.type)
        default = f.default
        if annotation == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif annotation.startswith("tuple"):
            kwargs.update(type=int, nargs="+", metavar="EPOCH")
        elif f.metadata.get("parse") == "lr":
            kwargs.update(type=parse_lr, metavar="LR|auto")
        else:
            base = annotation.replace(" | None", "")
            kwargs["type"] = {"int": int, "float": float, "str": str}[base]
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = base.upper() if base != "str" else "VALUE"
        kwargs["default"] = default
        kwargs["help"] += " (default: %(default)s)"
        names = [flag(f.name), *(["--max-lr"] if f.name == "lr" else [])]
        parser.add_argument(*names, **kwargs)


def parse_lr(text: str) -> float | str:
    """argparse type of ``--lr``: a float, or ``auto`` (run the LR range test first)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a number or auto") from None


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Returns a Config from parsed flags (raises ConfigError on bad values)."""
    names = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return (base or Config()).replace(**values)


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> Config:
    """Parses ``argv`` (``--config JSON`` first, flags override it) into a Config; bad input exits 2."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:
        try:
            parser.set_defaults(**Config.load(args.config).to_dict())
        except (OSError, ValueError, TypeError) as e:
            parser.error(f"--config {args.config}: {e}")
        args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as e:
        parser.error(str(e))


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    """Prints ``prog: error: message`` as one line on stderr and exits with ``code`` (no traceback)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)
