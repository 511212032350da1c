"""Picking a few images of every class from the shared CIFAR-10 archive (tests and experiments), no side effects."""

from __future__ import annotations

import tarfile
from pathlib import Path


def first_per_class(tar: tarfile.TarFile, per_class: dict[str, int]) -> list[tarfile.TarInfo]:
    """Members of the archive's first ``per_class[split]`` images of every split/class folder (and dirs)."""
    chosen, counts = [], {}
    for member in tar:
        parts = Path(member.name).parts
        split = next((p for p in parts if p in per_class), None)
        if member.isdir() or split is None:
            chosen.append(member)
            continue
        folder = str(Path(member.name).parent)
        counts[folder] = counts.get(folder, 0) + 1
        if counts[folder] <= per_class[split]:
            chosen.append(member)
    return chosen
