"""The shared archive given as --data-dir, with cpu_quick's subset (20,000 training images). First, for
reference, GNU ``tar -xzf`` of the archive and jaxcifar's unpack of it into the cache
(``unpack_image_folder_archive``); then the first load (the unpacked copy is there: decodes all 60,000 images,
writes the decoded-image cache, takes the subset), and two more loads, of the same and of another subset
(read the cache). A temporary JAXCIFAR_CACHE_DIR, deleted at the end. Wall seconds, with the load average.

    python experiments/data_loading/archive_subset.py > experiments/data_loading/archive_subset.txt
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def main() -> None:
    cache = Path(tempfile.mkdtemp(prefix="jaxcifar-archive-subset-"))
    os.environ["JAXCIFAR_CACHE_DIR"] = str(cache)
    logging.basicConfig(level=logging.INFO, format="  log %(name)s: %(message)s", stream=sys.stdout)
    from jaxcifar import sources
    from jaxcifar.config import Config
    from jaxcifar.data import load_dataset

    try:
        (cache / "tar").mkdir()
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xzf", str(ARCHIVE), "-C", str(cache / "tar")], check=True)
        print(f"tar -xzf (reference, not used): {time.perf_counter() - t0:.2f}s (load average {_load()})")
        shutil.rmtree(cache / "tar")
        t0 = time.perf_counter()
        sources.unpack_image_folder_archive(ARCHIVE)
        print(f"unpack_image_folder_archive: {time.perf_counter() - t0:.2f}s (load average {_load()})")
        config = Config(data_dir=str(ARCHIVE), train_subset=20000, batch_size=128)
        for what, c in (
            ("first load (decode 60,000, write the cache)", config),
            ("second load, same subset", config),
            ("third load, --train-subset 5000", config.replace(train_subset=5000)),
        ):
            t0 = time.perf_counter()
            data = load_dataset(c)
            seconds = time.perf_counter() - t0
            print(f"{what}: {seconds:.2f}s, train {len(data.train)}, test {len(data.test)} (load average {_load()})")
        sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in cache.iterdir()}
        print("cache folder sizes (MB):", {k: round(v / 1e6) for k, v in sorted(sizes.items())})
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


if __name__ == "__main__":
    main()
