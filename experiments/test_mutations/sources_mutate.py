"""The mutations of sources.md: each applied alone in a copy of the branch (``--root``), its test run, then
undone. Usage: ``git archive HEAD | tar -x -C /tmp/mut; python sources_mutate.py --root /tmp/mut [--only N ...]``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

D = "tests/test_data.py"
TF = "tests/test_trust_files.py"
MUTATIONS = [  # (file, old, new, test file, test)
    (
        "jaxcifar/data.py",
        "    if sources.is_image_folder_archive(path):  # unpacked into the cache by the folder reader\n"
        '        return "folder"\n',
        "",
        D,
        "test_an_image_folder_archive_is_unpacked_once_and_read",
    ),
    (
        "jaxcifar/sources/image_folder.py",
        "    if root.is_file() and is_image_folder_archive(root):\n",
        "    if False:\n",
        D,
        "test_an_image_folder_archive_is_unpacked_once_and_read",
    ),
    (
        "jaxcifar/sources/archive.py",
        '    what = hashlib.sha256(f"{where}\\0{stat.st_size}\\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]\n',
        "    what = where\n",
        D,
        "test_a_replaced_archive_is_unpacked_again_and_the_old_copy_deleted",
    ),
    (
        "jaxcifar/sources/archive.py",
        "        _remove_older_copies(entry)\n",
        "",
        D,
        "test_a_replaced_archive_is_unpacked_again_and_the_old_copy_deleted",
    ),
    (
        "jaxcifar/sources/archive.py",
        "            if not member.isfile() or _image_member(member.name) != folder:\n",
        "            if _image_member(member.name) != folder:\n",
        D,
        "test_an_archive_unpacks_nothing_outside_its_image_tree",
    ),
    (
        "jaxcifar/sources/archive.py",
        'any(p == ".." or p.startswith(".") or "\\\\" in p for p in parts)',
        "False",
        D,
        "test_an_archive_unpacks_nothing_outside_its_image_tree",
    ),
    (
        "jaxcifar/sources/archive.py",
        '        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))\n',
        "        tmp = entry\n        entry.mkdir()\n",
        D,
        "test_an_unpack_killed_midway_leaves_no_copy_that_is_read",
    ),
    (
        "jaxcifar/sources/archive.py",
        "    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:\n",
        "    except (tarfile.TarError, zlib.error, gzip.BadGzipFile) as e:\n",
        D,
        "test_a_truncated_archive_ends_in_one_line_and_leaves_no_copy",
    ),
    (
        "jaxcifar/sources/image_folder.py",
        "    everything = _cached_or_decoded(root, listing, class_names, resize, workers, all(whole.values()))"
        " if cache else None\n",
        "    everything = None if not all(whole.values()) else (\n"
        "        _cached_or_decoded(root, listing, class_names, resize, workers, True) if cache else None\n"
        "    )\n",
        D,
        "test_a_subset_load_caches_the_whole_folder_for_the_next_one",
    ),
    (
        "jaxcifar/sources/image_folder.py",
        "        if everything_wanted:\n            raise\n",
        "        raise\n",
        D,
        "test_a_bad_image_outside_the_subset_fails_no_subset_load",
    ),
    (
        "jaxcifar/sources/decode_worker.py",
        "    die_with_parent(_parent)\n",
        "",
        TF,
        "test_decoding_processes_end_with_an_interrupted_parent",
    ),
    (
        "jaxcifar/sources/archive.py",
        "        remove_abandoned(entry.parent)\n",
        "",
        D,
        "test_an_unpack_killed_midway_leaves_no_copy_that_is_read",
    ),
    (
        "jaxcifar/sources/decode_worker.py",
        "        sys.exit(DATA_ERROR_EXIT)\n",
        "        sys.exit(1)\n",
        D,
        "test_parallel_decode_raises_the_serial_decodes_error",
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="a copy of the branch (never a worktree)")
    parser.add_argument("--only", type=int, nargs="*", help="the rows to run (1-based); default all")
    args = parser.parse_args()
    for number, (path, old, new, tests, test) in enumerate(MUTATIONS, 1):
        if args.only and number not in args.only:
            continue
        file = args.root / path
        text = file.read_text()
        assert text.count(old) == 1, (path, old)
        file.write_text(text.replace(old, new))
        try:
            argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "", tests, "-k", test]
            done = subprocess.run(argv, cwd=args.root, capture_output=True, text=True)
        finally:
            file.write_text(text)
        lines = done.stdout.splitlines()
        errors = [line for line in lines if line.startswith("E ")][:2]
        print(f"## M{number} {path}: {old.strip()[:90]!r} -> {new.strip()[:40]!r}\ntest: {test}\nresult: {lines[-1]}")
        print("\n".join(errors) + "\n", flush=True)


if __name__ == "__main__":
    main()
