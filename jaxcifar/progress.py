"""The progress bar class of every command and notebook: ``tqdm.auto``'s, without its notebook warning.

In a notebook without ipywidgets, importing ``tqdm.auto`` warns ("IProgress not found") and falls back to the
text bar; that fallback is fine, so the warning is dropped here, the one place that imports it. ``BAR_DISABLE``:
tqdm disables itself with ``disable=None`` when its stream is no terminal (CI logs); notebook widgets report no
terminal either, so there the bar is forced on.
"""

from __future__ import annotations

import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    from tqdm.auto import tqdm

BAR_DISABLE = False if any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__) else None

__all__ = ["BAR_DISABLE", "tqdm"]
