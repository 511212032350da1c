"""``python -m jaxcifar.train``: the training command (flags = Config fields, see ``--help``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from jaxcifar import cli
from jaxcifar.errors import JaxcifarError
from jaxcifar.trainer import fit


def build_parser() -> cli.ArgumentParser:
    """Returns the parser of ``python -m jaxcifar.train`` (one flag per Config field)."""
    parser = cli.ArgumentParser(
        prog="python -m jaxcifar.train",
        description="Train a CIFAR ResNet with JAX/Flax. Defaults: ResNet18, 20 epochs, SGD + OneCycle.",
    )
    cli.add_config_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (0 ok, 1 user error, 2 bad flags, 130 interrupted)."""
    parser = build_parser()
    config = cli.parse_config(parser, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        fit(config)
    except JaxcifarError as e:
        cli.fail(parser.prog, str(e))
    except KeyboardInterrupt:
        cli.fail(
            parser.prog, f"interrupted; finished epochs are saved in {config.workdir}: rerun with --resume", code=130
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
