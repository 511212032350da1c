"""Explain a trained run: ``make_report(workdir)`` and ``python -m jaxcifar.report``.

Loads a workdir's best checkpoint, predicts a whole split, and writes into the workdir:
``curves.png`` (loss and accuracy per epoch), ``lr.png`` (the learning rate of every step, against the epoch),
``misclassified.png`` (the N most confident mistakes), ``gradcam.png`` (Grad-CAM of the predicted
class on those N images),
``confusion.png`` and ``report.json`` (accuracy, per-class accuracy, confusion matrix, the
misclassified examples). With ``--cam METHOD[,METHOD...]`` also ``cam.png`` (those N images x the
chosen methods of ``jaxcifar.cam``), the methods' faithfulness metrics in report.json (``cam``) and the
figure as the TensorBoard image ``report/cam`` under ``tensorboard/``.

``make_torch_report(checkpoint)`` (``--torch-checkpoint``) does the same for a PyTorch checkpoint with
the kuangliu/pytorch-cifar key layout (see ``jaxcifar.interop``), without the training curves.
"""

from __future__ import annotations

from jaxcifar import interrupts

if __name__ == "__main__":  # first, before the heavy imports below: Ctrl-C ends in one line from the start
    interrupts.install("python -m jaxcifar.report")

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from jaxcifar import analysis, cam, cam_metrics, cli, distributed, gradcam, interop, models, optim, plots, transforms
from jaxcifar.checkpoint import load_variables
from jaxcifar.config import Config
from jaxcifar.data import Dataset, load_dataset
from jaxcifar.errors import CheckpointError, ConfigError, DataError, RunFileError
from jaxcifar.files import check_name, ensure_dir, save_figure, write_json
from jaxcifar.layout import RunDir
from jaxcifar.network import build_model
from jaxcifar.workdir import WorkdirLock
from jaxcifar.writers import TensorBoardWriter

SPLITS = ("test", "val", "train")
FIGURES = ("curves", "lr", "misclassified", "gradcam", "confusion")
TORCH_FIGURES = ("misclassified", "gradcam", "confusion")  # a PyTorch checkpoint has no jaxcifar history


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """What a report shows: the ``n`` most confident mistakes of ``split``, Grad-CAM at ``layer`` (one
    smaller than 5x5 only with ``allow_small_layer``), predictions averaged over ``tta`` views, pictures
    at ``dpi``; ``cam_methods`` (names of ``jaxcifar.cam.METHODS``) adds their maps and metrics.
    Invalid values raise ConfigError naming the flag."""

    n: int = 10
    layer: str | None = None  # None: the model's own Grad-CAM layer (jaxcifar.models.gradcam_layer)
    split: str = "test"
    tta: str = "none"
    allow_small_layer: bool = False
    dpi: int = 100
    cam_methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [m for m in self.cam_methods if m not in cam.METHODS]
        if unknown or len(set(self.cam_methods)) != len(self.cam_methods):
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "a method is repeated"
            raise ConfigError(f"--cam {','.join(self.cam_methods)}: {what}; available: {', '.join(cam.METHODS)}")
        if self.split not in SPLITS:
            raise ConfigError(f"--split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.tta not in transforms.TTA_MODES:
            raise ConfigError(f"--tta {self.tta!r} is not one of {', '.join(transforms.TTA_MODES)}")
        if self.n < 1:
            raise ConfigError(f"--n must be >= 1, got {self.n}")


@dataclasses.dataclass(frozen=True)
class Report:
    """What ``make_report`` produced: the numbers (as in report.json), the figures, and the PNG paths."""

    summary: dict[str, Any]
    figures: dict[str, Figure]
    paths: dict[str, Path]


def load_run_config(workdir: str | Path) -> Config:
    """Returns the Config saved in ``workdir/config.json`` (CheckpointError when absent or unreadable)."""
    rundir = RunDir(check_name(workdir, "--workdir"))
    if Path(workdir).exists() and not Path(workdir).is_dir():
        raise CheckpointError(f"--workdir {workdir} is a file, not a folder")
    if not Path(workdir).is_dir():
        raise CheckpointError(f"--workdir {workdir}: no such folder")
    if not rundir.config_json.is_file():
        raise CheckpointError(f"--workdir {workdir}: no config.json (not a jaxcifar training workdir)")
    return rundir.saved_config()


def lr_per_step(config: Config, num_train: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (steps int (T,), learning rates float32 (T,)) of the run's schedule over all its steps."""
    steps_per_epoch = run_steps_per_epoch(config, num_train)
    schedule = optim.make_schedule(config, steps_per_epoch)
    steps = np.arange(config.epochs * steps_per_epoch)
    return steps, np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))


def run_steps_per_epoch(config: Config, num_train: int) -> int:
    """Returns the train steps per epoch of a run of ``config`` on ``num_train`` images (at least 1)."""
    return max(1, num_train // config.batch_size)


def make_report(
    workdir: str | Path,
    options: ReportOptions | None = None,
    *,
    config: Config | None = None,
    dataset: Dataset | None = None,
    out_dir: str | Path | None = None,
) -> Report:
    """Writes the pictures and ``report.json`` of a training run into ``out_dir`` (default ``workdir``)
    and returns the ``Report``: ``FIGURES`` (training curves and LR schedule from history.json, then
    what ``explain`` draws) of its best checkpoint, the EMA weights when the run kept them.

    ``config`` defaults to the workdir's config.json, ``dataset`` to loading it from that config.
    Holds the workdir's lock for reading (``workdir.WorkdirLock``, shared): CheckpointError while a run
    or LR range test holds it. Raises ``JaxcifarError`` subclasses for a missing workdir, checkpoint or
    split, or a bad option.
    """
    with reading(workdir):
        return _make_report(workdir, options, config, dataset, out_dir)


def reading(workdir: str | Path) -> contextlib.AbstractContextManager[Any]:
    """Returns the shared lock of a training workdir for a report (nothing in the other processes of a
    multi-process run: process 0 holds the run's lock, and they read its checkpoint with it)."""
    return WorkdirLock(workdir, shared=True) if distributed.is_main_process() else contextlib.nullcontext()


def _make_report(
    workdir: str | Path,
    options: ReportOptions | None,
    config: Config | None,
    dataset: Dataset | None,
    out_dir: str | Path | None,
) -> Report:
    options = options or ReportOptions()
    if out_dir is not None:
        check_name(out_dir, "--out-dir", utf8=False)
    config = config or load_run_config(workdir)
    history = RunDir(workdir).read_history()
    dataset = dataset or load_dataset(config)
    model = build_model(config, jax.devices()[:1])
    variables, meta = load_variables(workdir, model, ema=config.ema_decay is not None)
    figures = {
        "curves": plots.plot_curves(history, dpi=options.dpi),
        "lr": plots.plot_lr(
            lr_per_step(config, len(dataset.train)),
            dpi=options.dpi,
            steps_per_epoch=run_steps_per_epoch(config, len(dataset.train)),
        ),
    }
    checkpoint = {"epoch": meta.get("epoch"), "step": meta.get("step")}
    return explain(model, variables, dataset, options, Path(out_dir or workdir), figures, checkpoint)


def make_torch_report(
    checkpoint: str | Path,
    model: str | None = None,
    options: ReportOptions | None = None,
    *,
    data_dir: str | None = None,
    dataset: Dataset | None = None,
    mean: Sequence[float] = interop.KUANGLIU_MEAN,
    std: Sequence[float] = interop.KUANGLIU_STD,
    subset: int | None = None,
    out_dir: str | Path | None = None,
) -> Report:
    """Explains a PyTorch checkpoint (kuangliu/pytorch-cifar layout) with the pictures of ``explain``
    (``TORCH_FIGURES``: no training curves) and returns the ``Report``.

    ``model`` is ``resnet18``/``resnet34`` (default: from the checkpoint's keys); width and class count
    come from the checkpoint (10 classes: CIFAR-10, 100: CIFAR-100). The images are normalized with
    ``mean``/``std``, the transform the model was trained with (default: kuangliu's). ``dataset``
    defaults to loading the test (or train) split from ``data_dir`` as ``--data-source auto`` does,
    ``subset`` keeps that many images of it (stratified). Files go to ``out_dir`` (default:
    ``<checkpoint stem>_report`` beside the checkpoint). Needs torch. Raises ``JaxcifarError``
    subclasses for an unreadable or mismatching checkpoint, bad options or data.
    """
    options = options or ReportOptions()
    if options.split not in ("test", "train"):
        raise ConfigError(f"--split {options.split!r}: a PyTorch checkpoint is reported on test or train")
    for name, values in (("mean", mean), ("std", std)):
        if len(tuple(values)) != 3 or (name == "std" and min(values) <= 0):
            raise ConfigError(f"--{name} needs 3 values (R G B){', all > 0' if name == 'std' else ''}, got {values}")
    variables, meta = interop.load_torch_checkpoint(checkpoint, model)
    datasets = {10: "cifar10", 100: "cifar100"}
    if meta["num_classes"] not in datasets:
        raise CheckpointError(f"{checkpoint}: {meta['num_classes']} classes; the report knows CIFAR-10 and CIFAR-100")
    out = Path(out_dir) if out_dir else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_report")
    if dataset is None:
        few = meta["num_classes"]  # one image per class of the split that is not reported (never decoded in full)
        subsets = {"train_subset": subset, "test_subset": few}
        if options.split == "test":
            subsets = {"train_subset": few, "test_subset": subset}
        # A Config of the data only (source, folder, subsets); batch_size 1: nothing is trained.
        dataset = load_dataset(
            Config(dataset=datasets[meta["num_classes"]], data_dir=data_dir, batch_size=1, **subsets)
        )
    dataset = dataclasses.replace(dataset, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    network = models.get_model(meta["model"], width=meta["width"], num_classes=meta["num_classes"])
    info = {
        "torch_checkpoint": str(checkpoint),
        "model": meta["model"],
        "width": meta["width"],
        "epoch": meta.get("epoch"),
        "acc": meta.get("acc"),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
    }
    return explain(network, variables, dataset, options, out, {}, info)


def explain(
    model: nn.Module,
    variables: dict[str, Any],
    dataset: Dataset,
    options: ReportOptions,
    out: Path,
    figures: dict[str, Figure],
    checkpoint: dict[str, Any],
) -> Report:
    """Predicts ``options.split`` with ``model.apply(variables, ...)`` and writes into ``out`` the given
    ``figures`` plus ``misclassified``, ``gradcam`` (of the predicted class, on the plain image) and
    ``confusion`` PNGs and ``report.json`` (accuracy, loss, per-class accuracy, confusion matrix, the
    mistakes, ``checkpoint`` as given). Returns the ``Report``; ConfigError for a Grad-CAM layer smaller
    than 5x5 without ``options.allow_small_layer``, DataError for a split the dataset lacks."""
    if check_name(out, "--out-dir", utf8=False).exists() and not out.is_dir():
        raise RunFileError(f"--out-dir {out} is a file, not a folder")
    data = getattr(dataset, options.split)
    if data is None:
        raise DataError(f"--split {options.split}: this run has no {options.split} split (it needs --val-fraction > 0)")
    layer, dpi = options.layer or models.gradcam_layer(model), options.dpi
    try:
        image_shape = (1, *data.images.shape[1:])
        resolution = gradcam.check_layer(model, variables, image_shape, layer, options.allow_small_layer)
    except ValueError as e:
        raise ConfigError(f"--layer {layer}: {e}") from None
    probs, preds = analysis.predict(
        model, variables, data.images, dataset.mean, dataset.std, batch_size=EVAL_BATCH, tta=options.tta
    )
    mistakes = analysis.misclassified(data.images, data.labels, probs, n=options.n)
    confusion = analysis.confusion_matrix(data.labels, preds, dataset.num_classes)
    per_class = analysis.per_class_accuracy(data.labels, preds, dataset.num_classes)
    nll = -np.log(np.clip(probs[np.arange(len(data)), data.labels], 1e-12, None))
    names = dataset.class_names
    figures = dict(figures)
    figures["misclassified"] = plots.plot_misclassified(
        mistakes.images, mistakes.true, mistakes.pred, mistakes.confidence, names, n=options.n, dpi=dpi
    )
    layer_label = f"{layer}, {resolution[0]}x{resolution[1]}"
    if len(mistakes):
        normalized = transforms.normalize(mistakes.images, dataset.mean, dataset.std)
        cams = gradcam.grad_cam(
            model, variables, normalized, layer, targets=mistakes.pred, allow_small=options.allow_small_layer
        )
        figures["gradcam"] = plots.plot_gradcam(
            mistakes.images, np.asarray(cams), mistakes.true, mistakes.pred, names, layer_label=layer_label, dpi=dpi
        )
    cam_summary = None
    if options.cam_methods and len(mistakes):
        figures["cam"], cam_summary = _cam_methods(model, variables, dataset, mistakes, options, layer, layer_label)
    figures["confusion"] = plots.plot_confusion(confusion, names, dpi=dpi)

    ensure_dir(out, "--out-dir")
    paths = {name: RunDir(out).figure(name) for name in figures}
    for name, fig in figures.items():
        save_figure(fig, paths[name], dpi=dpi)
    summary = {
        "split": options.split,
        "tta": options.tta,
        "images": len(data),
        "accuracy": float(np.mean(preds == data.labels)),
        "loss": float(nll.mean()),
        "checkpoint": checkpoint,
        "layer": layer_label,
        "class_names": list(names),
        "per_class_accuracy": {c: float(a) for c, a in zip(names, per_class, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "misclassified": [
            {"index": int(i), "true": names[t], "pred": names[p], "confidence": float(c)}
            for i, t, p, c in zip(mistakes.indices, mistakes.true, mistakes.pred, mistakes.confidence, strict=True)
        ],
        "figures": {name: path.name for name, path in paths.items()},
    }
    if cam_summary is not None:
        summary["cam"] = cam_summary
        writer = TensorBoardWriter(RunDir(out).tensorboard)
        try:
            writer.add_image("report/cam", plots.figure_to_array(figures["cam"]), 0)
            writer.flush()
        finally:
            writer.close()
    write_json(RunDir(out).report_json, summary)
    return Report(summary=summary, figures=figures, paths=paths)


def _cam_methods(
    model: nn.Module,
    variables: dict[str, Any],
    dataset: Dataset,
    mistakes: Any,
    options: ReportOptions,
    layer: str,
    layer_label: str,
) -> tuple[Figure, dict[str, Any]]:
    """The ``cam`` figure (mistakes x ``options.cam_methods``, predicted class) and its report.json entry:
    per method, each faithfulness metric's mean and per-image values (in the order of ``misclassified``)."""
    normalized = transforms.normalize(mistakes.images, dataset.mean, dataset.std)
    maps: dict[str, np.ndarray] = {}
    metrics: dict[str, Any] = {}
    for method in options.cam_methods:
        maps[method] = np.asarray(
            cam.cam(
                model,
                variables,
                normalized,
                layer,
                method,
                targets=mistakes.pred,
                allow_small=options.allow_small_layer,
            )
        )
        values = cam_metrics.faithfulness(model, variables, normalized, maps[method], mistakes.pred)
        metrics[method] = {
            name: {"mean": float(np.mean(v)), "per_image": [float(x) for x in v]} for name, v in values.items()
        }
    figure = plots.plot_cam_methods(
        mistakes.images, maps, mistakes.true, mistakes.pred, dataset.class_names, layer_label, dpi=options.dpi
    )
    summary = {
        "layer": layer_label,
        "target": "logit of the predicted class",
        "road": "percentile 80 most relevant first, 20 least relevant first, zero noise",
        "methods": metrics,
    }
    return figure, summary


EVAL_BATCH = 1000  # images per jitted prediction batch (the last one padded), as --eval-batch-size


def build_parser() -> cli.ArgumentParser:
    """Returns the parser of ``python -m jaxcifar.report``."""
    parser = cli.ArgumentParser(
        prog="python -m jaxcifar.report",
        description="Write curves, misclassified and Grad-CAM galleries, the confusion matrix and report.json "
        "for a training workdir (its best checkpoint), or for a PyTorch checkpoint (--torch-checkpoint).",
    )
    parser.add_argument("--workdir", help="The training run's workdir (holds config.json, best/).")
    parser.add_argument(
        "--torch-checkpoint",
        metavar="PATH",
        help="Explain this PyTorch checkpoint instead of a workdir: a kuangliu/pytorch-cifar ResNet18/34 "
        "state_dict, or its {'net': ..., 'acc', 'epoch'} ckpt.pth (needs torch: pip install 'jaxcifar[torch]'). "
        "No curves; the data come from --data-dir (or tensorflow-datasets).",
    )
    parser.add_argument(
        "--model",
        choices=models.available_models(),
        help="With --torch-checkpoint: the architecture (default: told by the checkpoint's keys).",
    )
    parser.add_argument(
        "--mean",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="With --torch-checkpoint: the normalization mean the model was trained with "
        f"(default: kuangliu/pytorch-cifar's {' '.join(map(str, interop.KUANGLIU_MEAN))}).",
    )
    parser.add_argument(
        "--std",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="With --torch-checkpoint: the normalization std the model was trained with "
        f"(default: kuangliu/pytorch-cifar's {' '.join(map(str, interop.KUANGLIU_STD))}; "
        "CIFAR-10's true std is 0.2470 0.2435 0.2616).",
    )
    parser.add_argument(
        "--subset",
        type=int,
        metavar="N",
        help="With --torch-checkpoint: only this many images of the split (stratified).",
    )
    parser.add_argument("--n", type=int, default=10, help="How many misclassified images to show (default: 10).")
    parser.add_argument(
        "--layer",
        default=None,
        help="Grad-CAM layer (default: the model's own: layer3 of resnet18/34, 8x8 on 32x32 inputs; layer2 of "
        "resnet9, 8x8; block2 of airbench, 7x7).",
    )
    parser.add_argument("--split", default="test", choices=SPLITS, help="Split to analyse (default: test).")
    parser.add_argument(
        "--cam",
        metavar="METHOD[,METHOD...]",
        help="Also draw these CAM methods on the misclassified images (cam.png, TensorBoard report/cam) and put "
        f"their faithfulness metrics in report.json; methods: {', '.join(cam.METHODS)} (default: none).",
    )
    parser.add_argument(
        "--allow-small-layer",
        action="store_true",
        help="Allow a Grad-CAM layer smaller than 5x5 (layer4 on 32x32 inputs is 4x4: too coarse to localize).",
    )
    parser.add_argument("--data-dir", help="Read the data from here instead of the run's --data-dir.")
    parser.add_argument(
        "--tta",
        choices=transforms.TTA_MODES,
        default="none",
        help="Average predictions over test-time views (default: none; the report says which).",
    )
    parser.add_argument(
        "--out-dir",
        help="Write the files here instead of the workdir (with --torch-checkpoint: instead of "
        "<checkpoint stem>_report/ beside it).",
    )
    return parser


_TORCH_ONLY = ("model", "mean", "std", "subset")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the report CLI; returns 0, or exits 1 (user error) / 2 (bad flags) / 130 (Ctrl-C) with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.workdir is None) == (args.torch_checkpoint is None):
        parser.error("give either --workdir or --torch-checkpoint")
    if args.workdir is not None:
        given = [f"--{name}" for name in _TORCH_ONLY if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)} only go with --torch-checkpoint")
    if args.n < 1:
        parser.error(f"argument --n: must be >= 1, got {args.n}")
    if args.subset is not None and args.subset < 1:
        parser.error(f"argument --subset: must be >= 1, got {args.subset}")
    cli.configure_logging()
    if args.out_dir:
        out = Path(args.out_dir)
    elif args.workdir:
        out = Path(args.workdir)
    else:
        out = Path(args.torch_checkpoint).with_name(f"{Path(args.torch_checkpoint).stem}_report")
    started = time.time()

    def interrupted() -> str:
        paths = [RunDir(out).figure(name) for name in (*FIGURES, "cam")] + [RunDir(out).report_json]
        done = [p.name for p in paths if p.is_file() and p.stat().st_mtime >= started]
        written = f"{', '.join(done)} written (complete files)" if done else "no report file written"
        return f"{written} in {out}"

    memory = f"try a smaller --n (now {args.n}), or run it where more memory is free"
    return cli.run_command(parser.prog, lambda: _report(args), interrupted, memory)


def _report(args: Any) -> int:
    if args.out_dir is not None:  # before anything is loaded (a name that is not UTF-8 is fine: no checkpoint there)
        check_name(args.out_dir, "--out-dir", utf8=False)
    try:
        methods = tuple(m.strip() for m in args.cam.split(",") if m.strip()) if args.cam else ()
        options = ReportOptions(args.n, args.layer, args.split, args.tta, args.allow_small_layer, cam_methods=methods)
        if args.torch_checkpoint is not None:
            report = make_torch_report(
                args.torch_checkpoint,
                args.model,
                options,
                data_dir=args.data_dir,
                mean=args.mean or interop.KUANGLIU_MEAN,
                std=args.std or interop.KUANGLIU_STD,
                subset=args.subset,
                out_dir=args.out_dir,
            )
        else:
            with reading(args.workdir):  # before its config is read; make_report takes it again
                config = load_run_config(args.workdir)
                if args.data_dir:
                    config = config.replace(data_dir=args.data_dir)
                report = make_report(args.workdir, options, config=config, out_dir=args.out_dir)
    except ConfigError as e:  # the library's hint names the Python argument; the CLI's flag is this one
        raise ConfigError(str(e).replace("allow_small=True", "--allow-small-layer")) from None
    summary = report.summary
    tta = f" with TTA {summary['tta']}" if summary["tta"] != "none" else ""
    print(f"{summary['split']}: accuracy {100 * summary['accuracy']:.2f}% on {summary['images']} images{tta}")
    for name, path in report.paths.items():
        print(f"wrote {path}  ({name})")
    return 0


if __name__ == "__main__":
    interrupts.exit_with(main)
