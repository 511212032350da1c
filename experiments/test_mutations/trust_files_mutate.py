"""The mutations of trust_files.md: each applied alone in a copy of the branch (``--root``), its test run, then
undone. Usage: ``git archive HEAD | tar -x -C /tmp/mut; python trust_files_mutate.py --root /tmp/mut``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

T = "tests/test_trust_files.py"
MUTATIONS = [  # (file, old, new, test)
    (
        "jaxcifar/sources/decode.py",
        'if image.mode == "I" or image.mode.startswith("I;16"):',
        "if False:",
        "test_16_bit_pngs_decode_to_their_high_byte",
    ),
    (
        "jaxcifar/sources/cache.py",
        "FOLDER_CACHE_FORMAT = 2",
        "FOLDER_CACHE_FORMAT = 1",
        "test_folder_cache_of_the_clipping_decoder_is_not_served",
    ),
    (
        "jaxcifar/checkpoint.py",
        '        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":\n            return True',
        "        return True",
        "test_a_checkpointer_drops_only_the_callbacks_into_a_closed_loop",
    ),
    (
        "jaxcifar/checkpoint.py",
        "        drop_closed_loop_callbacks()\n",
        "",
        "test_a_checkpointer_drops_only_the_callbacks_into_a_closed_loop",
    ),
    (
        "jaxcifar/backend.py",
        "                removed.append(Path(entry.path))\n                continue",
        "                continue",
        "test_repair_compile_cache_deletes_the_entries_that_do_not_decompress",
    ),
    (
        "jaxcifar/backend.py",
        "                        path.unlink()\n",
        "                        pass\n",
        "test_repair_compile_cache_deletes_the_entries_that_do_not_decompress",
    ),
    (
        "jaxcifar/backend.py",
        '    jax.config.update("jax_compilation_cache_dir", str(path))\n    repair_compile_cache(path)\n',
        '    jax.config.update("jax_compilation_cache_dir", str(path))\n',
        "test_a_truncated_compile_cache_entry_is_replaced",
    ),
    (
        "jaxcifar/sources/decode_worker.py",
        "ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)",
        "pass",
        "test_decoding_processes_end_with_an_interrupted_parent",
    ),
    (
        "jaxcifar/sources/cache.py",
        "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while the writer holds it\n",
        "",
        "test_an_interrupted_cache_write_is_cleaned_up_at_the_next_load",
    ),
    (
        "jaxcifar/sources/image_folder.py",
        "    remove_abandoned(entry.parent)\n",
        "    pass\n",
        "test_an_interrupted_cache_write_is_cleaned_up_at_the_next_load",
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="a copy of the branch (never a worktree)")
    root = parser.parse_args().root
    for path, old, new, test in MUTATIONS:
        file = root / path
        text = file.read_text()
        assert text.count(old) == 1, (path, old)
        file.write_text(text.replace(old, new))
        try:
            argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "", T, "-k", test]
            done = subprocess.run(argv, cwd=root, capture_output=True, text=True)
        finally:
            file.write_text(text)
        lines = done.stdout.splitlines()
        errors = [line for line in lines if line.startswith("E ")][:2]
        print(f"## {path}: {old.strip()[:90]!r} -> {new.strip()[:40]!r}\ntest: {test}\nresult: {lines[-1]}")
        print("\n".join(errors) + "\n", flush=True)


if __name__ == "__main__":
    main()
