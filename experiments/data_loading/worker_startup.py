"""Start-up of one decoding process, before (a ``python -P -c`` program kept as a string in sources.py, commit
e142065) and after (``jaxcifar/sources/decode_worker.py`` run by its path), interleaved: the time until it would
read its request (package imported by location, the decoder importable). Needs git; run from anywhere.

    python experiments/data_loading/worker_startup.py > experiments/data_loading/worker_startup.txt
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BEFORE_COMMIT = "e142065"
ROUNDS = 7


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_COMMIT, "jaxcifar"], capture_output=True)
        subprocess.run(["tar", "-x", "-C", scratch], input=archive.stdout, check=True)
        old = f"{scratch}/jaxcifar"
        before = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('jaxcifar', '{old}/__init__.py', "
            f"submodule_search_locations=['{old}'])\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "sys.modules['jaxcifar'] = module\n"
            "spec.loader.exec_module(module)\n"
            "from jaxcifar.sources import _decode_worker\n"
        )
        new = REPO / "jaxcifar"
        after = (
            "import importlib.util, pathlib\n"
            f"spec = importlib.util.spec_from_file_location('w', '{new}/sources/decode_worker.py')\n"
            "worker = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(worker)\n"
            f"worker.import_package_from(pathlib.Path('{new}'))\n"
            "from jaxcifar.sources.image_file import decode_serial\n"
        )
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(ROUNDS):
            for name, code in (("before", before), ("after", after)):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-P", "-c", code], check=True, cwd=scratch)
                times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        print(f"{name}: best {min(seconds):.3f}s, median {statistics.median(seconds):.3f}s of {ROUNDS}")
    print("load average:", " ".join(open("/proc/loadavg").read().split()[:3]))


if __name__ == "__main__":
    main()
