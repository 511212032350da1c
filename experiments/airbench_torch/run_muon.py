"""airbench94_muon.py, airbench's own PyTorch script for its Muon record (KellerJordan/cifar10-airbench: 94.01 % in
2.59 s on an A100), on this machine's CPU and the shared JPEG images, to read beside jaxcifar's `airbench94_muon`
preset.

Nothing of airbench is copied here. The script is not on PyPI, so fetch it yourself into a temporary folder and
pass it with ``--script``; its SHA-256 is checked against the published version this adaptation was written for
(commit f1c599c of 2025-03-02, the newest in the copy of the repository fetched on 2026-12-04):

    curl -o /tmp/airbench94_muon.py https://raw.githubusercontent.com/KellerJordan/cifar10-airbench/\\
    f1c599c4af24aca803e3e65a6a7e52a502e09d0e/airbench94_muon.py

The script is imported as a module (its ``__main__`` block, which compiles the network, warms up on random labels
and then trains 200 runs, is not run) and its ``main(run, model)`` is called once per seed. Only the device and the
data loading are adapted, as ``run.py`` does for ``train94``:

- data: ``run.write_cifar_files`` (the same uint8 images jaxcifar trains on, the training images in one fixed
  random order, seed 0, since the script whitens from the first 5,000), read through the script's own
  ``CifarLoader`` with ``torch.load`` mapped to the CPU.
- device: the CPU in float32. ``nn.Module.cuda`` and ``.half`` do nothing (the script runs its network in float16
  on CUDA), the loader's float16 images are cast to float32 after it made them, CUDA events are a CPU clock.
  Newton-Schulz stays in bfloat16, as published (this CPU has AVX512-BF16).
- compile: none on the CPU. The script compiles its network (``mode="max-autotune"``) and
  ``zeropower_via_newtonschulz5`` with ``torch.compile``; here both run eagerly (``TORCHDYNAMO_DISABLE=1``), as
  PyTorch eager is what jaxcifar's speed is compared with (and ``run.py``'s ``train94`` does not compile either).
- ``--device cuda`` (a lent GPU, experiments/gpu_check): nothing of the device is adapted. As the script's own
  ``__main__`` does, the network is compiled and trained once on random labels first (the warm-up, timed apart);
  then the seeds. Copy the fetched script to the GPU machine beside the wheels (``$WHEELS``).
- logging: each row the script prints (``val_acc`` without TTA per epoch, ``time_seconds``: its timer, which counts
  the whitening and training but not the per-epoch evaluation; the last row ``tta_val_acc`` with the final
  evaluation timed) is kept, plus the wall seconds since this process started.

    python experiments/airbench_torch/run_muon.py --script /tmp/airbench94_muon.py \\
        --data-dir /tmp/data/cifar10-jpeg --runs 1 --out experiments/airbench_torch/airbench94_muon.json
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as airbench_run  # noqa: E402  (this folder's run.py: data files, CPU clock, records, statistics)

airbench_run.PROCESS_START = PROCESS_START  # one clock for the wall seconds of both modules

PUBLISHED_SHA256 = "704e29251a5207d8aed8a35adf13f772ff386b90a712aaddc2a28854385b536e"


def load_script(path: Path, check_hash: bool = True) -> Any:
    """Returns airbench94_muon.py at ``path`` imported as a module (its ``__main__`` block not run). Exits with one
    line if the file is not the published version and ``check_hash`` is set."""
    if not path.is_file():
        sys.exit(f"error: --script {path}: no such file; fetch airbench94_muon.py first (this file's docstring)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if check_hash and digest != PUBLISHED_SHA256:
        sys.exit(
            f"error: {path} has SHA-256 {digest}, not that of airbench94_muon.py at f1c599c ({PUBLISHED_SHA256});"
            " pass --any-version to run it anyway"
        )
    spec = importlib.util.spec_from_file_location("airbench94_muon", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def adapted(script: Any, records: list[dict[str, Any]], device: str = "cpu"):
    """Within: each row the script prints is appended to ``records``; with ``device`` "cpu" its loader, network and
    timers also run on the CPU in float32 ("cuda": as published). Restores everything on exit."""
    import torch

    base_loader, base_load, base_print = script.CifarLoader, torch.load, script.print_training_details

    class CpuLoader(base_loader):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.images = self.images.float()  # the script keeps them in float16 for the GPU

    def load_on_cpu(*args: Any, **kwargs: Any) -> Any:
        kwargs["map_location"] = "cpu"
        return base_load(*args, **kwargs)

    def keep_record(variables: dict[str, Any], is_final_entry: bool) -> None:
        records.append(airbench_run.epoch_record(variables, "time_seconds"))
        base_print(variables, is_final_entry)

    saved = [(script, "print_training_details", keep_record)]
    if device == "cpu":
        saved += [
            (script, "CifarLoader", CpuLoader),
            (torch, "load", load_on_cpu),
            (torch.cuda, "Event", airbench_run.CpuEvent),
            (torch.cuda, "synchronize", lambda *a, **k: None),
            (torch.nn.Module, "cuda", lambda self, *a, **k: self),
            (torch.nn.Module, "half", lambda self: self),
        ]
    with airbench_run.patched(saved):
        yield


def record(args: argparse.Namespace, runs: list[dict[str, Any]], data_ready: float, warmup: float | None) -> dict:
    """Returns the JSON record of the runs so far: each run, then mean and sample standard deviation."""
    where = "the CPU in float32, eager" if args.device == "cpu" else "CUDA as published (float16, torch.compile)"
    return {
        "what": f"airbench94_muon.py (KellerJordan/cifar10-airbench f1c599c) on {where}, the shared JPEG images"
        + (f", the first {args.limit} images only" if args.limit else ""),
        "command": " ".join(sys.argv),
        "script_sha256": hashlib.sha256(Path(args.script).read_bytes()).hexdigest(),
        **airbench_run.machine(args.device),
        "data_ready_wall_seconds": data_ready,
        "compile_and_warmup_wall_seconds": warmup,
        "runs": runs,
        "summary": airbench_run.summaries(runs, args.target),
    }


def main() -> None:
    """Runs ``--runs`` seeds of airbench94_muon.py's ``main`` on ``--device`` and writes the JSON record after each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", required=True, help="airbench94_muon.py, fetched (see this file's docstring).")
    parser.add_argument("--data-dir", required=True, help="The unpacked JPEG tree (train/ and test/ class folders).")
    parser.add_argument("--runs", type=int, default=1, help="Seeds 0..runs-1, one after another in this process.")
    parser.add_argument("--target", type=float, nargs="+", default=[0.85, 0.90], help="Accuracies to time.")
    parser.add_argument("--out", required=True, help="Where to write the JSON record (rewritten after each run).")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: float32, eager, adapted; cuda: as published (compiled, one warm-up run on random labels first).",
    )
    parser.add_argument(
        "--limit", type=int, help="Keep only the first N training and N test images (a smoke test; N >= 2000)."
    )
    parser.add_argument("--any-version", action="store_true", help="Run a script whose SHA-256 differs.")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 2000:
        sys.exit(f"error: --limit {args.limit}: the script's batch is 2,000 images; allowed: >= 2000")
    args.script = str(Path(args.script).resolve())  # read again after the chdir below
    if args.device == "cpu":
        os.environ["TORCHDYNAMO_DISABLE"] = "1"  # before torch is imported: torch.compile runs eagerly

    import torch

    script = load_script(Path(args.script), check_hash=not args.any_version)
    torch.set_num_threads(os.cpu_count() or 1)
    out, home = Path(args.out).resolve(), os.getcwd()
    with tempfile.TemporaryDirectory(prefix="airbench-muon-") as tmp:
        airbench_run.write_cifar_files(Path(tmp), args.data_dir)
        if args.limit is not None:
            for name in ("train", "test"):
                path = Path(tmp) / "cifar10" / f"{name}.pt"
                data = torch.load(path)
                data["images"], data["labels"] = data["images"][: args.limit], data["labels"][: args.limit]
                torch.save(data, path)
        data_ready = time.perf_counter() - PROCESS_START
        os.chdir(tmp)  # the script reads ./cifar10/{train,test}.pt
        runs: list[dict[str, Any]] = []
        warmup = None
        with adapted(script, [], args.device):
            model = script.CifarNet().cuda().to(memory_format=torch.channels_last)
            if args.device == "cuda":  # the script's __main__: compile, then one run on random labels
                started = time.perf_counter()
                model.compile(mode="max-autotune")
                script.main("warmup", model)
                warmup = time.perf_counter() - started
        for seed in range(args.runs):
            torch.manual_seed(seed)
            records: list[dict[str, Any]] = []
            start = time.perf_counter()
            with adapted(script, records, args.device):
                script.main(seed, model)
            runs.append(airbench_run.run_record(seed, records, start, args.target))
            out.write_text(json.dumps(record(args, runs, data_ready, warmup), indent=2) + "\n")
        os.chdir(home)
    print(json.dumps(record(args, runs, data_ready, warmup)["summary"]))


if __name__ == "__main__":
    main()
