"""Test hook: pause a command at a named point, so that tests can make races and interrupts deterministic.

``JAXCIFAR_TEST_PAUSE=POINT:PATH`` (a test hook, not a user setting): when the process reaches ``POINT``,
it writes its pid to ``PATH.reached`` and waits until the file ``PATH`` exists (at most
``MAX_PAUSE_SECONDS``), then goes on. Ctrl-C and SIGTERM end a paused command as any other moment.
Without the variable, or at another point, ``pause`` returns at once.

Points:

- ``after-data``: in ``setup.RunSetup.create`` (every run, resumed or not, and ``lr_find``), once the data is
  loaded and checked, before anything is compiled.
- ``report``: in ``pipeline.run`` (``--report``), when the report phase starts, before anything of it is made.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "JAXCIFAR_TEST_PAUSE"
POINTS = ("after-data", "report")
MAX_PAUSE_SECONDS = 600.0
POLL_SECONDS = 0.01


def pause(point: str) -> None:
    """Waits at ``point`` while ``JAXCIFAR_TEST_PAUSE`` asks for it (see the module docstring); returns None."""
    assert point in POINTS, point
    wanted, _, path = os.environ.get(PAUSE_ENV, "").partition(":")
    if wanted != point or not path:
        return
    go = Path(path)
    Path(f"{path}.reached").write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + MAX_PAUSE_SECONDS
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
