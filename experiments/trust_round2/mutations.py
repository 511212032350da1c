"""Breaks the code each quick test of tests/test_trust_race.py guards, once per mutation, and runs that test.

    .venv/bin/python experiments/trust_round2/mutations.py > experiments/trust_round2/mutations.txt

Each mutation is a (file, text, replacement); the file is restored with ``git checkout`` after the run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MUTATIONS = [
    (
        "no lock before the workdir is read (holding takes none)",
        "jaxcifar/workdir.py",
        "    lock = WorkdirLock(path) if parallel.is_main_process() else None\n",
        "    lock = None\n",
        "test_the_workdir_is_locked_before_anything_is_decided_about_it",
    ),
    (
        "re-entrant in any thread",
        "jaxcifar/workdir.py",
        "if hold is not None and hold.pid == os.getpid() and hold.thread == threading.get_ident():",
        "if hold is not None and hold.pid == os.getpid():",
        "test_the_lock_is_reentrant_in_its_thread_only",
    ),
    (
        "an inner release lets the lock go",
        "jaxcifar/workdir.py",
        "            if hold.count > 0:\n                return\n",
        "",
        "test_the_lock_is_reentrant_in_its_thread_only",
    ),
    (
        "report takes no lock",
        "jaxcifar/report.py",
        "    return WorkdirLock(workdir, shared=True) if distributed.is_main_process() else contextlib.nullcontext()",
        "    return contextlib.nullcontext()",
        "test_lr_find_and_report_refuse_a_held_workdir",
    ),
    (
        "lr_find takes no lock",
        "jaxcifar/lr_find.py",
        "with WorkdirLock(out_dir) if out_dir is not None else contextlib.nullcontext():",
        "with contextlib.nullcontext():",
        "test_lr_find_and_report_refuse_a_held_workdir",
    ),
    (
        "a finished run never writes its report (the old rule)",
        "jaxcifar/pipeline.py",
        "report_due = config.report and not (finished and report_written(workdir))",
        "report_due = config.report and not finished",
        "test_a_finished_run_resumed_with_report_writes_the_missing_report",
    ),
    (
        "the interrupt line ignores the missing report",
        "jaxcifar/workdir.py",
        "if report and epochs is not None and epoch >= epochs and not report_written(workdir):",
        "if False:",
        "test_a_finished_run_resumed_with_report_writes_the_missing_report",
    ),
    (
        "the pid is written when the lock is taken (before anything is decided)",
        "jaxcifar/workdir.py",
        "            lock.acquire(claim=False)",
        "            lock.acquire()",
        "test_a_command_that_writes_nothing_leaves_the_lock_file_alone",
    ),
    (
        "an unclaimed lock leaves what it created",
        "jaxcifar/workdir.py",
        "        if not hold.claimed or (self.path in hold.created and os.listdir(self.workdir) == [LOCK_NAME]):\n",
        "        if False:\n",
        "test_the_workdir_is_locked_before_anything_is_decided_about_it",
    ),
]


def main() -> int:
    for what, path, text, replacement, test in MUTATIONS:
        file = REPO / path
        source = file.read_text()
        assert source.count(text) == 1, (what, path)
        file.write_text(source.replace(text, replacement))
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-x",
                    "-p",
                    "no:cacheprovider",
                    "--tb=line",
                    "tests/test_trust_race.py",
                    "-k",
                    test,
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            subprocess.run(["git", "checkout", "--", path], cwd=REPO, check=True)
        lines = done.stdout.splitlines()
        message = next((line for line in lines if line.startswith(("E ", "/")) and "Error" in line), "")
        summary = lines[-1] if lines else done.stderr[-300:]
        print(
            f"## {what}\n{path}: {text.strip()!r} -> {replacement.strip()!r}\n{test}: {summary}\n{message}\n",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
