"""What every command line shares: flags built from the Config dataclass, and endings in one line.

A user error ends as ``PROG: error: MESSAGE`` on stderr with exit code 2 (a bad value: ``ConfigError``
and argparse errors) or 1 (bad data, workdir or checkpoint: other ``JaxcifarError``s; running out of
memory, which the sizes' estimate in ``jaxcifar.sizing`` let through). Ctrl-C (SIGINT)
and SIGTERM end the command at once, from any point (also inside a compile), with one line saying
what is saved and exit code 130 (143): see ``run_command`` and ``jaxcifar.interrupts``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from jaxcifar import console, interrupts
from jaxcifar.config import Config, flag
from jaxcifar.errors import ConfigError, JaxcifarError


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
            kwargs.update(type=int, nargs="+", metavar=f.metadata.get("metavar", "EPOCH"))
        elif f.metadata.get("parse") == "lr":
            kwargs.update(type=parse_lr, metavar="LR|auto")
        else:
            base = annotation.replace(" | None", "")
            kwargs["type"] = {"int": int, "float": finite_float, "str": str}[base]
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = base.upper() if base != "str" else "VALUE"
        kwargs["default"] = default
        kwargs["help"] += " (default: %(default)s)"
        names = [flag(f.name), *(["--max-lr"] if f.name == "lr" else [])]
        parser.add_argument(*names, **kwargs)


def parse_lr(text: str) -> float | str:
    """argparse type of ``--lr``: a finite float, or ``auto`` (run the LR range test first)."""
    if text == "auto":
        return text
    try:
        return finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a finite number or auto") from None


def finite_float(text: str) -> float:
    """argparse type of a float flag: a finite number (inf and nan are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a finite number")
    return value


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
        except JaxcifarError as e:
            parser.error(f"--config {e}")
        args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as e:
        parser.error(str(e))


def config_to_argv(config: Config) -> list[str]:
    """Returns the command-line flags that ``parse_config`` turns back into ``config``: one per field whose
    value differs from its default, in field order, spelled as ``add_config_flags`` declares them
    (``--report`` / ``--no-nesterov``, ``--milestones 5 10``, ``--lr auto``; a value starting with ``-`` as
    ``--workdir=-x``, so that argparse does not take it for a flag).

    Raises ValueError for a value no flag can spell: an empty tuple, or None where the default is not None.
    """
    argv: list[str] = []
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        name = flag(f.name)
        if isinstance(value, bool):
            argv.append(name if value else "--no-" + name[2:])
        elif isinstance(value, tuple) and value:
            argv += [name, *map(str, value)]
        elif value is None or isinstance(value, tuple):
            raise ValueError(f"{name}: {value!r} has no command-line spelling")
        else:
            text = str(value)  # a float's str is its shortest round-tripping repr
            argv += [f"{name}={text}"] if text.startswith("-") else [name, text]
    return argv


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    """Prints ``prog: error: message`` as one line on stderr and exits with ``code`` (no traceback)."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def configure_logging() -> None:
    """Logs jaxcifar's warnings to stderr; silences orbax's (absl) and asyncio's loggers, whose failures
    (e.g. a checkpoint write on a full disk: a traceback per array) reach the user as one jaxcifar error."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def one_line(message: str) -> str:
    """Returns ``message`` folded onto one line, printable (a name that is not UTF-8 shows its bytes as ``\\xff``)."""
    return console.printable(" ".join(str(message).split()))


def exit_code(error: Exception) -> int:
    """Returns 2 for a bad value (``ConfigError``), 1 for other user errors (data, workdir, checkpoint)."""
    return 2 if isinstance(error, ConfigError) else 1


def out_of_memory(error: BaseException) -> str | None:
    """Returns what ran out of memory, from ``error``: XLA's ``RESOURCE_EXHAUSTED: ...`` (a ``JaxRuntimeError``
    from a compile, a transfer or a step) or numpy's ``MemoryError`` (host arrays); None for any other error."""
    if isinstance(error, MemoryError):
        return one_line(f"{error.__class__.__name__}: {error}").rstrip(".")[:300]
    text = str(error).lstrip()
    if error.__class__.__name__ in ("JaxRuntimeError", "XlaRuntimeError") and text.startswith("RESOURCE_EXHAUSTED"):
        return one_line(text.splitlines()[0]).rstrip(".")[:300]
    return None


def run_command(
    prog: str,
    body: Callable[[], int],
    interrupted: Callable[[], str],
    memory_hint: str = "free memory for it, or run it where more is free",
) -> int:
    """Runs a command's ``body`` and returns its exit code; user errors and interrupts end in one line.

    A ``JaxcifarError`` ends as ``PROG: error: ...`` with ``exit_code``; running out of memory (``out_of_memory``)
    as ``PROG: error: out of memory (...); <memory_hint>`` with exit code 1 (a run's checkpoints are
    committed by then: ``loop.fit`` closes its checkpointer on every way out). Where the command's
    ``__main__`` installed ``jaxcifar.interrupts``, SIGINT/SIGTERM end the process at once with
    ``PROG: interrupted: <interrupted()>`` and exit code 130/143.
    """
    interrupts.describe(interrupted)
    try:
        code = body()
    except JaxcifarError as e:
        interrupts.disarm()
        fail(prog, str(e), exit_code(e))
    except Exception as e:
        what = out_of_memory(e)
        if what is None:
            raise
        interrupts.disarm()
        fail(prog, f"out of memory ({what}): more than this process can have; {memory_hint}")
    interrupts.disarm()
    return code
