"""A whole training run as the command line makes it: ``run(config)`` = LR range test (``--lr auto``)
-> ``loop.fit`` -> report (``--report``). The one module that puts them together."""

from __future__ import annotations

import tempfile
import time
from typing import Any, NamedTuple

import jax

from jaxcifar import distributed, testhooks
from jaxcifar.config import Config
from jaxcifar.data import Dataset
from jaxcifar.layout import RunDir
from jaxcifar.loop import check_resume, train
from jaxcifar.lr_find import LRFindResult, range_test
from jaxcifar.plots import figure_to_array
from jaxcifar.report import Report, ReportOptions, make_report
from jaxcifar.setup import RunSetup, command, echo
from jaxcifar.state import TrainState
from jaxcifar.timing import Timing
from jaxcifar.workdir import claim_workdir
from jaxcifar.writers import TensorBoardWriter


class RunResult(NamedTuple):
    """What ``run`` returns: the final state, the per-epoch history, the LR range test (with ``--lr auto``
    on a fresh run, else None), the report (with ``--report`` when this call wrote it, else None) and
    the timing record (seconds per phase, as in ``timing.json``)."""

    state: TrainState
    history: list[dict[str, Any]]
    lr_find: LRFindResult | None = None
    report: Report | None = None
    timing: dict[str, float] | None = None


def run(
    config: Config, dataset: Dataset | None = None, *, verbose: bool = True, started: float | None = None
) -> RunResult:
    """Trains ``config`` as ``python -m jaxcifar.train`` does and returns a ``RunResult``.

    With ``config.lr == "auto"`` the LR range test runs first (``lr_find.png``/``.json`` in the workdir)
    and its suggestion is the peak LR (a resumed run keeps its saved LR); with ``config.report`` the
    pictures and report.json of the best checkpoint are written after training and logged to
    TensorBoard (also when a finished run is resumed and its report was not written yet). The workdir's
    lock is held from before anything is read from it until the end (``setup.command``, once for the whole
    command: the LR range test, ``loop.train`` and the report run inside it). The run
    ends with one line saying where its time went, also written to ``timing.json`` (``started``: a
    ``time.perf_counter()`` value, e.g. the process start, from which start-up is counted; default now).
    ``dataset`` overrides loading from ``config``. Raises what ``fit`` raises.
    """
    timing = Timing(started)
    timing.add("startup", time.perf_counter() - timing.started)
    with command(config, config.workdir) as rundir:  # one start-up and one lock over the whole command
        result = _run(config, rundir, dataset, verbose, timing)
    if config.distributed:
        distributed.finish()  # waits for every process: none of them ends before the others are done
    return result


def _run(config: Config, rundir: RunDir, dataset: Dataset | None, verbose: bool, timing: Timing) -> RunResult:
    """``run`` once its command has started (``setup.command``: the workdir's lock is held)."""
    main = verbose and distributed.is_main_process()  # one run: its lines come from process 0 (fit: devices from all)
    config, meta = check_resume(config, rundir, verbose=main)  # fails before any work
    finished = meta is not None and int(meta["epoch"]) >= config.epochs
    # A finished run resumed with --report: the report is what is left when a previous command did not write it.
    report_due = config.report and not (finished and rundir.report_written())
    if not finished or report_due:
        claim_workdir(rundir.path)  # decided: this command writes the workdir (a refused one names its pid)
    found, prepared = None, None
    if meta is None or config.lr == "auto":  # a fresh run (a resumed one has its saved LR): the range test
        # (--lr auto), training and the report share one set-up, so the data is loaded once
        prepared = RunSetup.create(config, dataset, verbose=verbose, timing=timing)
        dataset = prepared.dataset
    if config.lr == "auto":
        with timing.phase("lr_find"):
            found = range_test(prepared, rundir if distributed.is_main_process() else None, verbose=main)
        echo(f"lr: {found.suggestion:.3g} from the LR range test ({found.rule}), see {rundir.lr_find_png}", main)
        config = config.replace(lr=found.suggestion)
        prepared = prepared.with_config(config)
    result = train(config, rundir, meta, dataset, setup=prepared, verbose=verbose, timing=timing)
    report = None
    is_main = jax.process_index() == 0
    if report_due:
        with timing.phase("report"), tempfile.TemporaryDirectory() as elsewhere:
            testhooks.pause("report")
            # Every process makes it (orbax reads a checkpoint collectively); others write it to a temporary folder.
            out = None if is_main else elsewhere
            report = make_report(
                rundir.path, ReportOptions(tta=config.tta), config=config, dataset=dataset, out_dir=out
            )
            if is_main:
                log_report(report, rundir, epoch=len(result.history))
        summary = report.summary
        echo(
            f"report: {summary['split']} accuracy {100 * summary['accuracy']:.2f}% (best checkpoint), "
            f"{', '.join(p.name for p in report.paths.values())} in {rundir.path}",
            main,
        )
    record = timing.record()
    if not finished:  # a finished run: one line says there was nothing to do
        if is_main:
            record = timing.write(rundir.timing_json)
        echo(timing.summary_line(record), main)
    return RunResult(result.state, result.history, found, report, record)


def log_report(report: Report, rundir: RunDir, epoch: int) -> None:
    """Logs the report's figures to the workdir's TensorBoard as images ``report/NAME`` at ``epoch``."""
    writer = TensorBoardWriter(rundir.tensorboard)
    try:
        for name, figure in report.figures.items():
            writer.add_image(f"report/{name}", figure_to_array(figure), epoch)
        writer.flush()
    finally:
        writer.close()
