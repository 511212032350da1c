"""Leslie Smith's LR range test, as fastai's ``lr_find``: ``python -m jaxcifar.lr_find``.

The learning rate grows exponentially from ``--lr-find-start`` to ``--lr-find-end`` over
``--lr-find-steps`` training steps (the run's ``setup.RunSetup``: its model, initial state, train step,
optimizer and batches, as training has them; only the LR schedule is the test's), recording
the loss smoothed as fastai does (exponential moving average, beta 0.98, debiased). It stops early
once the smoothed loss exceeds 4x its best. As fastai, the rules ignore the first 10 % and the last 5
points. The suggestion for onecycle's max LR is the LR at the smoothed loss's minimum (``minimum``);
fastai's rules (``valley``, its default since v2.5, the steepest descent and its ``minimum / 10``) are
reported beside it in ``lr_find.json``. Why not valley: see ``minimum`` and
experiments/lr_find_sweep/README.md. The model and optimizer state are thrown away: a real run starts fresh.
"""

from __future__ import annotations

from jaxcifar import interrupts

if __name__ == "__main__":  # first, before the heavy imports below: Ctrl-C ends in one line from the start
    interrupts.install("python -m jaxcifar.lr_find")

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optax

from jaxcifar import cli, distributed
from jaxcifar.config import Config
from jaxcifar.data import Dataset
from jaxcifar.errors import JaxcifarError
from jaxcifar.files import ensure_dir, write_json
from jaxcifar.layout import RunDir
from jaxcifar.plots import plot_lr_find
from jaxcifar.setup import RunSetup, command, echo

SMOOTHING = 0.98
DIVERGENCE = 4.0
SKIP_START = 0.1  # fraction of the points the rules ignore at the start (fastai: num_it // 10)
SKIP_END = 5  # points the rules ignore at the end (fastai: 5)
RULE = "minimum"  # the rule whose LR is the suggestion


@dataclasses.dataclass(frozen=True)
class LRFindResult:
    """LRs and losses per step (float arrays (T,)), the suggestion, how it was chosen and every rule's LR."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float
    rule: str
    steepest: float
    stopped_early: bool
    rules: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """Returns a JSON-serializable dict (what ``lr_find.json`` holds)."""
        return {
            "suggestion": self.suggestion,
            "rule": self.rule,
            "rules": dict(self.rules),
            "steepest": self.steepest,
            "stopped_early": self.stopped_early,
            "steps": len(self.lrs),
            "lrs": self.lrs.tolist(),
            "losses": self.losses.tolist(),
            "smoothed": self.smoothed.tolist(),
        }


def valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's "valley" rule: an LR about half-way into the longest decreasing stretch of the loss.

    Finds the longest (not necessarily contiguous) decreasing subsequence of ``losses``, splits its
    span into thirds and returns the LR at ``start + third + third / 2`` (fastai.callback.schedule).
    """
    n = len(losses)
    longest = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[max_end] < longest[i]:
                max_end, max_start = i, i - longest[i]
    third = (max_end - max_start) / 3
    return float(lrs[max_start + int(third) + int(third / 2)])


def steepest(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The LR where the smoothed loss falls fastest against log(LR) (fastai's "steep")."""
    return float(lrs[int(np.argmin(np.gradient(losses, np.log(lrs))))])


def minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The LR at the smoothed loss's minimum: the suggested onecycle max LR.

    This is Leslie Smith's upper bound of the range test (the LR beyond which the loss stops falling),
    which is what onecycle's peak wants: the schedule warms up from ``max / 25`` over 30 % of the run
    and anneals after, and with BatchNorm the weights' norm grows during that warm-up, which lowers the
    effective LR of every scale-invariant layer, so the run tolerates the LR at which this short,
    cold test stops improving. fastai's ``valley`` (a point half-way along the longest decreasing stretch,
    which includes the long flat start of a from-scratch test, so it moves with ``--lr-find-start``) and
    ``minimum / 10`` target a fixed LR without warm-up (fine-tuning); on ResNet18 at width 16 they
    suggested 52x and 10x below the best peak LR of a sweep, this rule 1.05x (experiments/lr_find_sweep).
    The debiased EMA lags the raw loss by a few steps, so this minimum lies a little past the raw one.
    """
    return float(lrs[int(np.argmin(losses))])


def suggestions(lrs: np.ndarray, losses: np.ndarray) -> dict[str, float]:
    """Every rule's LR for a smoothed range-test curve, after fastai's cut (first 10 %, last 5 points).

    ``minimum`` (the suggestion, see ``minimum``), fastai's ``valley``, ``steepest`` and
    ``minimum/10`` (fastai's ``minimum`` suggestion). A curve that the cut would leave with fewer than 5
    points is used whole.
    """
    lrs, losses = np.asarray(lrs, float), np.asarray(losses, float)
    start, end = int(len(lrs) * SKIP_START), len(lrs) - SKIP_END
    if end - start < 5:
        start, end = 0, len(lrs)
    lrs, losses = lrs[start:end], losses[start:end]
    at_min = minimum(lrs, losses)
    return {
        "minimum": at_min,
        "valley": valley(lrs, losses),
        "steepest": steepest(lrs, losses),
        "minimum/10": at_min / 10,
    }


def lr_find(
    config: Config, dataset: Dataset | None = None, *, out_dir: str | Path | None = None, verbose: bool = True
) -> LRFindResult:
    """Runs the range test for ``config`` (its ``lr`` is not used) and returns the result; with ``out_dir``
    also writes ``lr_find.json`` and ``lr_find.png`` there, holding its lock (``setup.command``; taken
    again when ``jaxcifar.run`` holds it). Raises ConfigError before any work when the batch does not fit the
    devices (``sizing.check_fits``), CheckpointError when another command holds ``out_dir``."""
    with command(config, out_dir, claim=True) as rundir:
        setup = RunSetup.create(config, dataset, verbose=verbose)
        return range_test(setup, rundir if distributed.is_main_process() else None, verbose=verbose)


def range_test(setup: RunSetup, rundir: RunDir | None = None, verbose: bool = True) -> LRFindResult:
    """Runs the range test on ``setup`` (its train step, initial state and batches, as training has them, with
    the LR growing exponentially over ``--lr-find-steps``) and returns the result; writes ``lr_find.json`` and
    ``lr_find.png`` into ``rundir`` unless it is None. JaxcifarError when the loss diverges within 5 steps."""
    config = setup.config
    n_steps, start, end = config.lr_find_steps, config.lr_find_start, config.lr_find_end
    echo(f"lr_find: up to {n_steps} steps from LR {start:g} to {end:g} (the train step compiles first)...", verbose)
    schedule = optax.exponential_decay(start, transition_steps=n_steps - 1, decay_rate=end / start)
    state = setup.initial_state(setup.optimizer(schedule))
    lrs, losses, smoothed = [], [], []
    average, best, stopped, rows = 0.0, np.inf, False, None
    for i in range(n_steps):
        epoch, row = divmod(i, setup.steps_per_epoch)  # the batches of training's first epochs, in order
        if row == 0:
            rows = setup.epoch_rows(epoch + 1)
        state, metrics = setup.train_step(state, setup.batch(rows, row))
        loss = float(metrics["loss_sum"] / metrics["count"])
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        debiased = average / (1 - SMOOTHING ** (i + 1))
        lrs.append(float(schedule(i)))
        losses.append(loss)
        smoothed.append(debiased)
        best = min(best, debiased)
        if not np.isfinite(debiased) or debiased > DIVERGENCE * best:
            stopped = True
            break
    result = _result(np.asarray(lrs), np.asarray(losses), np.asarray(smoothed), stopped, start)
    if rundir is not None:
        ensure_dir(rundir.path, "--workdir")
        write_json(rundir.lr_find_json, result.to_dict())
        plot_lr_find(
            result.lrs, result.smoothed, result.suggestion, result.steepest, path=rundir.lr_find_png, rule=result.rule
        )
    return result


def _result(lrs: np.ndarray, losses: np.ndarray, smoothed: np.ndarray, stopped: bool, start: float) -> LRFindResult:
    """Returns the ``LRFindResult`` of a finished test: the rules on the finite part of the smoothed curve."""
    finite = np.isfinite(smoothed)
    if finite.sum() < 5:
        raise JaxcifarError(f"LR range test diverged after {finite.sum()} steps; lower --lr-find-start ({start:g})")
    rules = suggestions(lrs[finite], smoothed[finite])
    return LRFindResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=rules[RULE],
        rule=RULE,
        steepest=rules["steepest"],
        stopped_early=stopped,
        rules=rules,
    )


def build_parser() -> cli.ArgumentParser:
    """Returns the parser of ``python -m jaxcifar.lr_find`` (the training flags; ``--workdir`` gets the files)."""
    parser = cli.ArgumentParser(
        prog="python -m jaxcifar.lr_find",
        description="LR range test (Leslie Smith / fastai lr_find) for a training configuration; writes "
        "lr_find.png and lr_find.json into --workdir and prints the suggested onecycle max LR.",
    )
    cli.add_config_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the range test CLI; returns 0, or exits 1/2/130 (Ctrl-C) with one line."""
    parser = build_parser()
    config = cli.parse_config(parser, argv)
    cli.configure_logging()
    return cli.run_command(
        parser.prog,
        lambda: _run(config),
        lambda: f"the range test did not finish; nothing written to {config.workdir}",
        f"try a smaller --batch-size (now {config.batch_size})",
    )


def _run(config: Config) -> int:
    result = lr_find(config, out_dir=config.workdir)
    note = " (stopped early: the loss diverged)" if result.stopped_early else ""
    print(f"ran {len(result.lrs)} steps from {config.lr_find_start:g} to {result.lrs[-1]:.3g}{note}")
    print(f"suggested max LR for onecycle: {result.suggestion:.3g} ({result.rule} rule)")
    print(f"steepest descent at LR {result.steepest:.3g}")
    print(f"wrote {RunDir(config.workdir).lr_find_png} and lr_find.json")
    return 0


if __name__ == "__main__":
    interrupts.exit_with(main)
