"""Explain a trained run: ``make_report(workdir)`` and ``python -m jaxcifar.report``.

Loads a workdir's best checkpoint, predicts a whole split, and writes into the workdir:
``curves.png`` (loss and accuracy per epoch), ``lr.png``, ``misclassified.png`` (the N most
confident mistakes), ``gradcam.png`` (Grad-CAM of the predicted class on those N images),
``confusion.png`` and ``report.json`` (accuracy, per-class accuracy, confusion matrix, the
misclassified examples).

``make_torch_report(checkpoint)`` (``--torch-checkpoint``) does the same for a PyTorch checkpoint with
the kuangliu/pytorch-cifar key layout (see ``jaxcifar.interop``), without the training curves.
"""

from __future__ import annotations

from jaxcifar import interrupts

if __name__ == "__main__":  # first, before the heavy imports below: Ctrl-C ends in one line from the start
    interrupts.install("python -m jaxcifar.report")

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from jaxcifar import analysis, cli, gradcam, interop, optim, plots, transforms
from jaxcifar.checkpoint import load_best, saved_config
from jaxcifar.config import Config
from jaxcifar.data import Dataset, Split, load_dataset
from jaxcifar.errors import CheckpointError, ConfigError, DataError, RunFileError
from jaxcifar.files import ensure_dir, read_history, save_figure, write_json
from jaxcifar.models import available_models
from jaxcifar.state import create_train_state
from jaxcifar.trainer import build_model

SPLITS = ("test", "val", "train")
FIGURES = ("curves", "lr", "misclassified", "gradcam", "confusion")
TORCH_FIGURES = ("misclassified", "gradcam", "confusion")  # a PyTorch checkpoint has no jaxcifar history


@dataclasses.dataclass(frozen=True)
class Report:
    """What ``make_report`` produced: the numbers (as in report.json), the figures, and the PNG paths."""

    summary: dict[str, Any]
    figures: dict[str, Figure]
    paths: dict[str, Path]


def load_run_config(workdir: str | Path) -> Config:
    """Returns the Config saved in ``workdir/config.json`` (CheckpointError when absent or unreadable)."""
    path = Path(workdir) / "config.json"
    if Path(workdir).exists() and not Path(workdir).is_dir():
        raise CheckpointError(f"--workdir {workdir} is a file, not a folder")
    if not Path(workdir).is_dir():
        raise CheckpointError(f"--workdir {workdir}: no such folder")
    if not path.is_file():
        raise CheckpointError(f"--workdir {workdir}: no config.json (not a jaxcifar training workdir)")
    return saved_config(workdir)


def load_best_variables(workdir: str | Path, config: Config, dataset: Dataset) -> tuple[dict[str, Any], dict]:
    """Returns ({"params", "batch_stats"}, checkpoint metadata) of the workdir's best checkpoint.

    These are the EMA weights when the run kept them (``--ema-decay``), as training evaluated them.
    """
    model = build_model(config)
    steps_per_epoch = max(1, len(dataset.train) // config.batch_size)
    tx, _ = optim.make_training_optimizer(config, steps_per_epoch)
    use_ema = config.ema_decay is not None
    state, meta = load_best(workdir, create_train_state(model, tx, config.seed, ema=use_ema))
    return state.variables(ema=use_ema), meta


def lr_per_step(config: Config, num_train: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (steps int (T,), learning rates float32 (T,)) of the run's schedule over all its steps."""
    steps_per_epoch = max(1, num_train // config.batch_size)
    schedule = optim.make_schedule(config, steps_per_epoch)
    steps = np.arange(config.epochs * steps_per_epoch)
    return steps, np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))


def _split(dataset: Dataset, name: str) -> Split:
    split = getattr(dataset, name)
    if split is None:
        raise DataError(f"--split {name}: this run has no {name} split (it needs --val-fraction > 0)")
    return split


def make_report(
    workdir: str | Path,
    n: int = 10,
    layer: str = "layer3",
    split: str = "test",
    *,
    dataset: Dataset | None = None,
    variables: dict[str, Any] | None = None,
    config: Config | None = None,
    allow_small_layer: bool = False,
    out_dir: str | Path | None = None,
    dpi: int = 100,
    tta: str = "none",
    training_curves: bool = True,
    checkpoint_info: dict[str, Any] | None = None,
) -> Report:
    """Writes the pictures and ``report.json`` of a run into ``out_dir`` (default ``workdir``).

    ``config`` defaults to the workdir's config.json, ``dataset`` to loading it from that config,
    ``variables`` to the best checkpoint (EMA weights when kept); ``tta`` averages predictions over
    test-time views (the Grad-CAM maps explain the plain image). Returns a ``Report`` with the
    summary dict and the figures.
    ``training_curves=False`` leaves out ``curves`` and ``lr`` (for a model trained elsewhere);
    ``checkpoint_info`` is what report.json records under ``checkpoint`` (default: the best
    checkpoint's epoch and step).
    Raises ``JaxcifarError`` subclasses for a missing workdir/checkpoint/split, ValueError from
    ``grad_cam`` for a layer smaller than 5x5 unless ``allow_small_layer``.
    """
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    out = Path(out_dir or workdir)
    if out.exists() and not out.is_dir():
        raise RunFileError(f"--out-dir {out} is a file, not a folder")
    config = config or load_run_config(workdir)
    history = read_history(workdir) if training_curves else []
    dataset = dataset or load_dataset(config)
    _split(dataset, split)
    meta: dict[str, Any] = {}
    if variables is None:
        variables, meta = load_best_variables(workdir, config, dataset)
    model = build_model(config)
    images_shape = (1, *dataset.test.images.shape[1:])
    try:
        resolution = gradcam.check_layer(model, variables, images_shape, layer, allow_small_layer)
    except ValueError as e:
        raise ConfigError(f"--layer {layer}: {e}") from None

    data = _split(dataset, split)
    probs, preds = analysis.predict(
        model, variables, data.images, dataset.mean, dataset.std, batch_size=config.eval_batch_size, tta=tta
    )
    mistakes = analysis.misclassified(data.images, data.labels, probs, n=n)
    confusion = analysis.confusion_matrix(data.labels, preds, dataset.num_classes)
    per_class = analysis.per_class_accuracy(data.labels, preds, dataset.num_classes)
    nll = -np.log(np.clip(probs[np.arange(len(data)), data.labels], 1e-12, None))

    figures: dict[str, Figure] = {}
    if training_curves:
        figures["curves"] = plots.plot_curves(history, dpi=dpi)
        figures["lr"] = plots.plot_lr(lr_per_step(config, len(dataset.train)), dpi=dpi)
    figures["misclassified"] = plots.plot_misclassified(
        mistakes.images, mistakes.true, mistakes.pred, mistakes.confidence, dataset.class_names, n=n, dpi=dpi
    )
    layer_label = f"{layer}, {resolution[0]}x{resolution[1]}"
    if len(mistakes):
        normalized = transforms.normalize(mistakes.images, dataset.mean, dataset.std)
        cams = np.asarray(
            gradcam.grad_cam(model, variables, normalized, layer, targets=mistakes.pred, allow_small=allow_small_layer)
        )
        figures["gradcam"] = plots.plot_gradcam(
            mistakes.images, cams, mistakes.true, mistakes.pred, dataset.class_names, layer_label=layer_label, dpi=dpi
        )
    figures["confusion"] = plots.plot_confusion(confusion, dataset.class_names, dpi=dpi)

    ensure_dir(out, "--out-dir")
    paths = {name: out / f"{name}.png" for name in figures}
    for name, fig in figures.items():
        save_figure(fig, paths[name], dpi=dpi)
    summary = {
        "split": split,
        "tta": tta,
        "images": len(data),
        "accuracy": float(np.mean(preds == data.labels)),
        "loss": float(nll.mean()),
        "checkpoint": checkpoint_info
        if checkpoint_info is not None
        else ({"epoch": meta.get("epoch"), "step": meta.get("step")} if meta else None),
        "layer": layer_label,
        "class_names": list(dataset.class_names),
        "per_class_accuracy": {c: float(a) for c, a in zip(dataset.class_names, per_class, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "misclassified": [
            {"index": int(i), "true": dataset.class_names[t], "pred": dataset.class_names[p], "confidence": float(c)}
            for i, t, p, c in zip(mistakes.indices, mistakes.true, mistakes.pred, mistakes.confidence, strict=True)
        ],
        "figures": {name: path.name for name, path in paths.items()},
    }
    write_json(out / "report.json", summary)
    return Report(summary=summary, figures=figures, paths=paths)


def make_torch_report(
    checkpoint: str | Path,
    model: str | None = None,
    n: int = 10,
    layer: str = "layer3",
    split: str = "test",
    *,
    data_dir: str | None = None,
    dataset: Dataset | None = None,
    mean: Sequence[float] = interop.KUANGLIU_MEAN,
    std: Sequence[float] = interop.KUANGLIU_STD,
    subset: int | None = None,
    allow_small_layer: bool = False,
    out_dir: str | Path | None = None,
    dpi: int = 100,
    tta: str = "none",
) -> Report:
    """Explains a PyTorch checkpoint (kuangliu/pytorch-cifar layout) with the pictures of ``make_report``.

    ``model`` is ``resnet18``/``resnet34`` (default: from the checkpoint's keys); width and class count
    come from the checkpoint (10 classes: CIFAR-10, 100: CIFAR-100). The images are normalized with
    ``mean``/``std``, the transform the model was trained with (default: kuangliu's). ``dataset``
    defaults to loading the test (or train) split from ``data_dir`` as ``--data-source auto`` does,
    ``subset`` keeps that many images of it (stratified). Writes misclassified, Grad-CAM and confusion
    pictures and report.json into ``out_dir`` (default: ``<checkpoint stem>_report`` beside the
    file); returns the ``Report``. Needs torch. Raises ``JaxcifarError`` subclasses for an unreadable
    or mismatching checkpoint, bad flags or data.
    """
    if split not in ("test", "train"):
        raise ConfigError(f"--split {split!r}: a PyTorch checkpoint is reported on test or train")
    for name, values in (("mean", mean), ("std", std)):
        if len(tuple(values)) != 3 or (name == "std" and min(values) <= 0):
            raise ConfigError(f"--{name} needs 3 values (R G B){', all > 0' if name == 'std' else ''}, got {values}")
    variables, meta = interop.load_torch_checkpoint(checkpoint, model)
    datasets = {10: "cifar10", 100: "cifar100"}
    if meta["num_classes"] not in datasets:
        raise CheckpointError(f"{checkpoint}: {meta['num_classes']} classes; the report knows CIFAR-10 and CIFAR-100")
    out = Path(out_dir) if out_dir else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_report")
    few = meta["num_classes"]  # one image per class of the split that is not reported (never decoded in full)
    train_subset = subset if split == "train" else few
    config = Config(
        model=meta["model"],
        width=meta["width"],
        dataset=datasets[meta["num_classes"]],
        data_dir=data_dir,
        test_subset=subset if split == "test" else few,
        train_subset=train_subset,
        batch_size=min(Config.batch_size, train_subset or Config.batch_size),  # unused, but checked against the data
        workdir=str(out),
    )
    dataset = dataset or load_dataset(config)
    dataset = dataclasses.replace(dataset, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    info = {
        "torch_checkpoint": str(checkpoint),
        "model": meta["model"],
        "width": meta["width"],
        "epoch": meta.get("epoch"),
        "acc": meta.get("acc"),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
    }
    return make_report(
        out,
        n=n,
        layer=layer,
        split=split,
        dataset=dataset,
        variables=variables,
        config=config,
        allow_small_layer=allow_small_layer,
        out_dir=out,
        dpi=dpi,
        tta=tta,
        training_curves=False,
        checkpoint_info=info,
    )


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
        choices=available_models(),
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
        "--layer", default="layer3", help="Grad-CAM layer: layer1..layer4 (default: layer3, 8x8 on 32x32 inputs)."
    )
    parser.add_argument("--split", default="test", choices=SPLITS, help="Split to analyse (default: test).")
    parser.add_argument(
        "--allow-small-layer",
        action="store_true",
        help="Allow a Grad-CAM layer smaller than 5x5 (layer4 on 32x32 inputs is 4x4: too coarse to localize).",
    )
    parser.add_argument("--data-dir", help="Read the data from here instead of the run's --data-dir.")
    parser.add_argument(
        "--tta",
        choices=("none", "flip", "flip-translate"),
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
        names = [f"{name}.png" for name in FIGURES] + ["report.json"]
        done = [n for n in names if (out / n).is_file() and (out / n).stat().st_mtime >= started]
        written = f"{', '.join(done)} written (complete files)" if done else "no report file written"
        return f"{written} in {out}"

    return cli.run_command(parser.prog, lambda: _report(args), interrupted)


def _report(args: Any) -> int:
    try:
        if args.torch_checkpoint is not None:
            report = make_torch_report(
                args.torch_checkpoint,
                args.model,
                n=args.n,
                layer=args.layer,
                split=args.split,
                data_dir=args.data_dir,
                mean=args.mean or interop.KUANGLIU_MEAN,
                std=args.std or interop.KUANGLIU_STD,
                subset=args.subset,
                allow_small_layer=args.allow_small_layer,
                out_dir=args.out_dir,
                tta=args.tta,
            )
        else:
            config = load_run_config(args.workdir)
            if args.data_dir:
                config = config.replace(data_dir=args.data_dir)
            report = make_report(
                args.workdir,
                n=args.n,
                layer=args.layer,
                split=args.split,
                config=config,
                allow_small_layer=args.allow_small_layer,
                out_dir=args.out_dir,
                tta=args.tta,
            )
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
