"""``python -m jaxcifar.train``: the training command (flags = Config fields, see ``--help``)."""

from __future__ import annotations

import time

from jaxcifar import interrupts

STARTED = time.perf_counter()  # as a command, the run's start-up (imports included) is counted from here

if __name__ == "__main__":  # first, before the heavy imports below: Ctrl-C ends in one line from the start
    interrupts.install("python -m jaxcifar.train")

from collections.abc import Sequence

from jaxcifar import cli
from jaxcifar.pipeline import run
from jaxcifar.workdir import describe_saved


def build_parser() -> cli.ArgumentParser:
    """Returns the parser of ``python -m jaxcifar.train`` (one flag per Config field)."""
    parser = cli.ArgumentParser(
        prog="python -m jaxcifar.train",
        description="Train a CIFAR ResNet with JAX/Flax. Defaults: ResNet18, 20 epochs, SGD + OneCycle.",
    )
    cli.add_config_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    """Runs the CLI; returns the exit code (0 ok, 1 user error, 2 bad flags, 130 interrupted).
    ``started``: when the process started (``time.perf_counter()``), for the start-up time; default now."""
    started = time.perf_counter() if started is None else started
    parser = build_parser()
    config = cli.parse_config(parser, argv)
    cli.configure_logging()

    def body() -> int:
        run(config, started=started)
        return 0

    memory = f"try a smaller --batch-size (now {config.batch_size}) or --eval-batch-size (now {config.eval_batch_size})"
    return cli.run_command(
        parser.prog, body, lambda: describe_saved(config.workdir, epochs=config.epochs, report=config.report), memory
    )


if __name__ == "__main__":
    interrupts.exit_with(lambda: main(started=STARTED))
