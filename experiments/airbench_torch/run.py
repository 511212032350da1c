"""airbench's own PyTorch training (the published ``airbench`` package, ``train94``) on this machine's CPU and the
shared JPEG images, so that jaxcifar's race can be read side by side with it.

Nothing of airbench is copied here: the script installs ``airbench==0.1.8`` from PyPI into a temporary folder at
run time and calls its ``train94``. Only the device and the data loading are adapted:

- data: the same uint8 images jaxcifar trains on (``jaxcifar.data.load_dataset`` of the image folder), written as
  airbench's ``cifar10/{train,test}.pt``. The training images are put in one fixed random order (seed 0) first:
  airbench whitens from the first 5,000 training images, which in CIFAR-10's official order are a random
  sample, while an image folder is sorted by class.
- device: the CPU in float32 (airbench moves its network to CUDA in float16; its loader puts the images on
  GPU 0 in float16). ``torch.cuda.Event``/``synchronize``, which it uses to time its epochs, become a CPU clock.
- ``--device cuda`` (for a lent GPU, experiments/gpu_check): nothing of the device is adapted, airbench runs as
  published (CUDA, float16, its CUDA timers); ``--airbench-wheel`` installs it from a wheel carried to a machine
  without PyPI (``experiments/gpu_check/fetch_wheels.sh`` builds one).
- logging: each epoch's record (airbench's own ``val_acc`` without TTA, its ``total_time_seconds``, i.e. training
  time without evaluation, as it counts) is kept, plus the wall time since this process started.

Writes ``--out`` (JSON): per run the epochs, the TTA accuracy at the end and the time at which the test
accuracy first reached each ``--target``; then mean and sample standard deviation over the runs.

    python experiments/airbench_torch/run.py --data-dir /tmp/data/cifar10-jpeg --epochs 9.9 --runs 3 \\
        --target 0.85 0.90 --out experiments/airbench_torch/results.json
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

AIRBENCH = "airbench==0.1.8"


class CpuEvent:
    """Stands in for ``torch.cuda.Event(enable_timing=True)``: ``record`` reads the CPU clock."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.at = 0.0

    def record(self) -> None:
        """Notes the time now."""
        self.at = time.perf_counter()

    def elapsed_time(self, end: CpuEvent) -> float:
        """Returns the milliseconds from this event to ``end``."""
        return 1e3 * (end.at - self.at)


def install_airbench(folder: Path, wheel: str | None = None) -> Any:
    """Returns the imported ``airbench`` package, pip-installed (without dependencies) into ``folder`` from PyPI,
    or from the file ``wheel``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), wheel or AIRBENCH],
        check=True,
    )
    sys.path.insert(0, str(folder))
    return importlib.import_module("airbench")


def write_cifar_files(root: Path, data_dir: str) -> None:
    """Writes airbench's ``root/cifar10/{train,test}.pt`` from the image folder at ``data_dir``: uint8 NHWC images,
    int64 labels, the class names; the training images in one random order (seed 0)."""
    import torch

    from jaxcifar.config import Config
    from jaxcifar.data import load_dataset

    dataset = load_dataset(Config(data_dir=data_dir, data_source="folder"))
    order = np.random.default_rng(0).permutation(len(dataset.train))
    (root / "cifar10").mkdir(parents=True)
    for name, split, index in (("train", dataset.train, order), ("test", dataset.test, None)):
        images, labels = (split.images, split.labels) if index is None else (split.images[index], split.labels[index])
        torch.save(
            {
                "images": torch.from_numpy(np.ascontiguousarray(images)),
                "labels": torch.from_numpy(labels.astype(np.int64)),
                "classes": list(dataset.class_names),
            },
            root / "cifar10" / f"{name}.pt",
        )


def epoch_record(variables: dict[str, Any], seconds_key: str) -> dict[str, Any]:
    """Returns one row airbench prints (its ``variables``) as a record: epoch, accuracies without and with TTA, its
    training seconds (``variables[seconds_key]``) and the wall seconds since this process started."""
    return {
        "epoch": variables.get("epoch"),
        "val_acc": variables.get("val_acc"),
        "tta_val_acc": variables.get("tta_val_acc"),
        "train_seconds": variables.get(seconds_key),
        "wall_seconds": time.perf_counter() - PROCESS_START,
    }


@contextlib.contextmanager
def patched(replacements: list[tuple[Any, str, Any]]):
    """Within: each ``(owner, name, value)`` set as ``owner.name = value``; the originals restored on exit."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    try:
        for owner, name, value in replacements:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def run_record(seed: int, records: list[dict[str, Any]], start: float, targets: list[float]) -> dict[str, Any]:
    """Returns one seed's record from the rows it printed (the last is the final TTA evaluation) and its start."""
    final = records[-1]
    return {
        "seed": seed,
        "epochs": records[:-1],
        "tta_accuracy": final["tta_val_acc"],
        "train_seconds": final["train_seconds"],
        "run_wall_seconds": time.perf_counter() - start,
        "to_target": {str(t): time_to(records, t) for t in targets},
    }


def summaries(runs: list[dict[str, Any]], targets: list[float]) -> dict[str, Any]:
    """Returns mean and standard deviation over ``runs`` of the TTA accuracy, the training seconds and the training
    seconds to each target (over the runs that reached it)."""
    return {
        "tta_accuracy": summary([r["tta_accuracy"] for r in runs]),
        "train_seconds": summary([r["train_seconds"] for r in runs]),
        **{
            f"train_seconds_to_{t}": summary(
                [r["to_target"][str(t)]["train_seconds"] for r in runs if r["to_target"][str(t)]]
            )
            for t in targets
        },
    }


def machine(device: str) -> dict[str, Any]:
    """Returns the record's ``machine`` (CPU count, processor, torch version, the GPU's name on "cuda") and
    ``load_average_at_end`` (the load averages now)."""
    import torch

    return {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        },
        "load_average_at_end": os.getloadavg(),
    }


@contextlib.contextmanager
def adapted(airbench: Any, records: list[dict[str, Any]], device: str = "cpu"):
    """Within: each epoch's record airbench prints is appended to ``records``; with ``device`` "cpu" its loaders,
    network and timers also run on the CPU in float32 ("cuda": as published). Restores everything on exit."""
    import torch

    utils = importlib.import_module("airbench.utils")
    lib94 = importlib.import_module("airbench.lib_airbench94")
    base_loader = utils.CifarLoader

    class CpuLoader(base_loader):
        def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
            kwargs["gpu"] = "cpu"
            super().__init__(path, *args, **kwargs)
            self.images = self.images.float()  # airbench keeps them in float16 for the GPU

    base_print = utils.print_training_details

    def keep_record(variables: dict[str, Any], is_final_entry: bool) -> None:
        records.append(epoch_record(variables, "total_time_seconds"))
        base_print(variables, is_final_entry)

    saved = [(utils, "print_training_details", keep_record)]
    if device == "cpu":
        saved += [
            (utils, "CifarLoader", CpuLoader),
            (lib94, "CifarLoader", CpuLoader),
            (torch.cuda, "Event", CpuEvent),
            (torch.cuda, "synchronize", lambda *a, **k: None),
            (torch.nn.Module, "cuda", lambda self, *a, **k: self),
            (torch.nn.Module, "half", lambda self: self),
        ]
    with patched(saved):
        yield


def time_to(records: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """Returns the first epoch whose accuracy without TTA reached ``target``, with its train and wall seconds."""
    for record in records:
        if record["epoch"] != "eval" and record["val_acc"] is not None and record["val_acc"] >= target:
            return {key: record[key] for key in ("epoch", "train_seconds", "wall_seconds")}
    return None


def summary(values: list[float]) -> dict[str, float] | None:
    """Returns mean and sample standard deviation (0 for one value), or None for no values."""
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    """Runs ``--runs`` seeds of airbench's ``train94`` on ``--device`` and writes the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="The unpacked JPEG tree (train/ and test/ class folders).")
    parser.add_argument("--epochs", type=float, default=9.9, help="airbench's train_epochs (9.9 for airbench94).")
    parser.add_argument("--width", type=int, default=64, help="block1's width; blocks 2 and 3 get 4x (64/256/256).")
    parser.add_argument("--batch-size", type=int, default=1024, help="airbench's batch size (its LR is per example).")
    parser.add_argument("--tta-level", type=int, default=2, help="The final evaluation: 0 none, 1 mirror, 2 + shifts.")
    parser.add_argument("--runs", type=int, default=1, help="Seeds 0..runs-1, one after another in this process.")
    parser.add_argument("--target", type=float, nargs="+", default=[0.85, 0.90], help="Accuracies to time.")
    parser.add_argument("--out", required=True, help="Where to write the JSON record.")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu: float32, adapted; cuda: as published."
    )
    parser.add_argument("--airbench-wheel", help=f"A wheel of {AIRBENCH} to install instead of fetching it from PyPI.")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out, home = Path(args.out).resolve(), os.getcwd()
    with tempfile.TemporaryDirectory(prefix="airbench-") as tmp:
        airbench = install_airbench(Path(tmp) / "site", args.airbench_wheel)
        write_cifar_files(Path(tmp), args.data_dir)
        data_ready = time.perf_counter() - PROCESS_START
        os.chdir(tmp)  # airbench reads its test set from ./cifar10
        runs = []
        for seed in range(args.runs):
            torch.manual_seed(seed)
            records: list[dict[str, Any]] = []
            start = time.perf_counter()
            with adapted(airbench, records, args.device):
                loader = importlib.import_module("airbench.utils").CifarLoader(
                    "cifar10", train=True, batch_size=args.batch_size, aug={"flip": True, "translate": 2}, altflip=True
                )
                widths = {"block1": args.width, "block2": 4 * args.width, "block3": 4 * args.width}
                make_net = functools.partial(airbench.make_net94, widths=widths)
                airbench.train94(loader, epochs=args.epochs, tta_level=args.tta_level, make_net=make_net, run=seed)
            runs.append(run_record(seed, records, start, args.target))
        os.chdir(home)
    result = {
        "what": f"{AIRBENCH} train94 on the {'CPU in float32' if args.device == 'cpu' else 'GPU as published'}, "
        "the shared JPEG images",
        "command": " ".join(sys.argv),
        **machine(args.device),
        "data_ready_wall_seconds": data_ready,
        "runs": runs,
        "summary": summaries(runs, args.target),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
