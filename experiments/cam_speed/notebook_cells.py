"""Runs notebooks as tests/test_notebook.py does (smoke mode, the shared archive's first 150 train and 60
test images per class, JAX_DISABLE_MOST_OPTIMIZATIONS=1) and prints each code cell's run time.

Usage: notebook_cells.py NOTEBOOK [NOTEBOOK...] (from the repository root); scratch files go under /tmp/cam2.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.archive import first_per_class  # noqa: E402

SCRATCH = Path("/tmp/cam2")


def seconds(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.rstrip("Z")).timestamp()


def main() -> None:
    root = SCRATCH / "data"
    if not root.exists():
        with tarfile.open(REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz") as tar:
            tar.extractall(root, members=first_per_class(tar, {"train": 150, "test": 60}), filter="data")
    data = next(p for p in root.rglob("train") if p.is_dir()).parent
    for path in sys.argv[1:]:
        work = SCRATCH / "nb" / Path(path).stem
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        os.environ.update(
            JAXCIFAR_SMOKE="1",
            JAXCIFAR_DATA_DIR=str(data),
            JAXCIFAR_WORKDIR=str(work / "run"),
            MPLBACKEND="Agg",
            JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        )
        notebook = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}
        ).execute()
        print(f"== {path}: {time.perf_counter() - start:.1f} s in all, load {os.getloadavg()}")
        for cell in notebook.cells:
            stamps = cell.metadata.get("execution", {})
            if cell.cell_type == "code" and "shell.execute_reply" in stamps:
                took = seconds(stamps["shell.execute_reply"]) - seconds(stamps["iopub.execute_input"])
                print(f"{took:7.1f} s  {cell.source.splitlines()[0][:70]}")


if __name__ == "__main__":
    main()
