"""Wall time of importing a module in a fresh interpreter (median of N runs) and the heavy packages it loads.

Run from the repository root: ``.venv/bin/python experiments/config_leaf/import_time.py [N]``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

MODULES = ("jaxcifar", "jaxcifar.config", "jaxcifar.cli", "jaxcifar.train")
HEAVY = ("jax", "flax", "optax", "torch", "numpy")


def main(runs: int) -> None:
    for module in MODULES:
        code = f"import {module}, sys; print([m for m in {HEAVY!r} if m in sys.modules])"
        times, loaded = [], ""
        for _ in range(runs):
            start = time.perf_counter()
            loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"import {module:18s} median {median:.3f} s (min {min(times):.3f}) loads {loaded.strip()}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
