"""Files a run reads and leaves behind, as a user meets them (16-bit PNGs, orbax failing mid-write, a truncated
compile-cache entry, leftovers of Ctrl-C). Runs real ``python -m jaxcifar.train`` processes of the checkout
given by ``--repo``, so the same script measures the code before and after; see files.md."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

TINY = ["--width", "4", "--epochs", "2", "--batch-size", "32", "--eval-batch-size", "100"]


def env_for(repo: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1", "JAXCIFAR_CACHE_DIR": str(cache)}


def train(repo: Path, cache: Path, args: list[str], fsize: int | None = None, **popen) -> subprocess.Popen:
    """Starts ``python -m jaxcifar.train ARGS`` of ``repo`` (``fsize``: ``ulimit -f`` in bytes)."""

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen(
        [sys.executable, "-m", "jaxcifar.train", *args],
        cwd=repo,
        env=env_for(repo, cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
        **popen,
    )


def finish(process: subprocess.Popen, timeout: float = 900) -> tuple[int, list[str], list[str]]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out.splitlines(), err.splitlines()


def write_png16(path: Path, values: np.ndarray) -> None:
    """uint16 (H, W) as a 16-bit grayscale PNG."""
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(values.shape[0]))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], 16, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def case_png16(repo: Path, tmp: Path) -> dict:
    """A 16-bit grayscale PNG tree (2 classes, 3 train + 2 test each, values over 0..65535): the decoded pixels."""
    root = tmp / "png16"
    rng = np.random.default_rng(5)
    for split, n in (("train", 3), ("test", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                write_png16(root / split / name / f"{i}.png", rng.integers(0, 65536, (32, 32), dtype=np.uint16))
    code = (
        "import sys, json, numpy as np\nfrom PIL import Image\nfrom jaxcifar import sources\n"
        "root = sys.argv[1]\nlisting, _ = sources.list_image_folder(root)\nfiles = listing['train'][0]\n"
        "high = [(np.asarray(Image.open(p)) >> 8).astype(np.uint8) for p in files]\n"
        "want = np.stack([np.repeat(h[..., None], 3, 2) for h in high]).astype(int)\n"
        "out = {}\n"
        "for workers in (1, 2):\n"
        "    got = sources.read_image_folder(root, cache=False, workers=workers)[0]['train'][0]\n"
        "    error = int(np.abs(got.astype(int) - want).max())\n"
        "    out[f'workers={workers}'] = {'white': float((got == 255).mean()), 'max_error': error}\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(root)],
        env=env_for(repo, tmp / "cache"),
        cwd=repo,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}


def case_ulimit(repo: Path, cache: Path, data: Path, tmp: Path) -> dict:
    """``ulimit -f 100`` (100 KiB files) from the start; compile and folder caches warm (only read)."""
    rc, _out, err = finish(
        train(repo, cache, [*TINY, "--data-dir", str(data), "--workdir", str(tmp / "w-ulimit")], fsize=100 * 1024)
    )
    return {
        "exit": rc,
        "stderr_lines": len(err),
        "tracebacks": sum(line.startswith("Traceback") for line in err),
        "last": err[-1:],
    }


def case_rm_rf(repo: Path, cache: Path, data: Path, tmp: Path, tries: int = 3) -> list[dict]:
    """``rm -rf`` of the workdir while a checkpoint is being written (30 epochs; struck at the first orbax
    temporary folder after a committed checkpoint), ``tries`` times."""
    results = []
    for attempt in range(tries):
        workdir = tmp / f"w-rm-{attempt}"
        process = train(
            repo, cache, [*TINY[:2], "--epochs", "30", *TINY[4:], "--data-dir", str(data), "--workdir", str(workdir)]
        )
        struck = ""
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            names = [p.name for p in (workdir / "checkpoints").glob("*")]
            if any(n.isdigit() for n in names) and any("tmp" in n for n in names):
                shutil.rmtree(workdir, ignore_errors=True)
                struck = next(n for n in names if "tmp" in n)
                break
            time.sleep(0.002)
        rc, _out, err = finish(process)
        results.append(
            {
                "struck_while_writing": struck,
                "exit": rc,
                "stderr_lines": len(err),
                "tracebacks": sum(line.startswith("Traceback") for line in err),
                "last": err[-1:],
            }
        )
    return results


def case_compile_cache(repo: Path, data: Path, tmp: Path) -> dict:
    """A fresh compile cache filled by a run under ``ulimit -f 100`` (its larger entries are cut short), then
    two ordinary runs: how many "Error reading persistent compilation cache" warnings each prints."""
    cache = tmp / "cc-cache"
    result = {}
    for name, fsize in (("filled under ulimit -f 100", 100 * 1024), ("next run", None), ("run after", None)):
        started = time.monotonic()
        rc, out, err = finish(
            train(
                repo,
                cache,
                [*TINY, "--data-dir", str(data), "--workdir", str(tmp / f"w-cc-{len(result)}"), "--no-folder-cache"],
                fsize=fsize,
            )
        )
        compile_line = next((line for line in out if line.startswith("compile:")), "")
        result[name] = {
            "exit": rc,
            "cache_read_warnings": sum("Error reading persistent compilation cache" in line for line in err),
            "compile": compile_line.split("(")[0].strip(),
            "seconds": round(time.monotonic() - started, 1),
            "other_stderr": [line for line in err if "compilation cache" in line and "Error reading" not in line][:2],
        }
    return result


def _decoder_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (
                    int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
                    and "_decode_worker" in (entry / "cmdline").read_text()
                ):
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def case_decoders_after_ctrl_c(repo: Path, cache: Path, full: Path, tmp: Path) -> dict:
    """Ctrl-C 1 s after the decoding processes of a 60,000-image load start (no folder cache): how long they run on."""
    process = train(repo, cache, [*TINY, "--data-dir", str(full), "--workdir", str(tmp / "w-dec"), "--no-folder-cache"])
    children: list[int] = []
    deadline = time.monotonic() + 300
    while process.poll() is None and not children and time.monotonic() < deadline:
        children = _decoder_children(process.pid)
        time.sleep(0.01)
    if not children:
        process.kill()
        return {"error": "no decoding process seen"}
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    rc, _out, err = finish(process)
    ended = time.monotonic()
    while any(_alive(c) for c in children) and time.monotonic() - ended < 120:
        time.sleep(0.01)
    return {
        "exit": rc,
        "stderr": err[-1:],
        "decoders": len(children),
        "ran_on_seconds": round(time.monotonic() - ended, 2),
    }


def case_cache_write_ctrl_c(repo: Path, full: Path, small: Path, tmp: Path) -> dict:
    """Ctrl-C while the folder cache of the 60,000 images is written; then one load of another folder (the
    cache's next access): the hidden temporary folder left before and after it."""
    cache = tmp / "fc-cache"
    process = train(repo, cache, [*TINY, "--data-dir", str(full), "--workdir", str(tmp / "w-fc")])
    folders = cache / "folders"
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        if folders.is_dir() and any(p.name.endswith(".tmp") and any(p.iterdir()) for p in folders.iterdir()):
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    rc, _out, err = finish(process)

    def leftovers() -> dict[str, float]:
        return {
            p.name: round(sum(f.stat().st_size for f in p.rglob("*")) / 1e6, 1)
            for p in folders.iterdir()
            if p.name.endswith(".tmp")
        }

    before = leftovers()
    code = "import sys\nfrom jaxcifar import sources\nsources.read_image_folder(sys.argv[1])\n"
    subprocess.run([sys.executable, "-c", code, str(small)], env=env_for(repo, cache), cwd=repo, check=True)
    return {"exit": rc, "stderr": err[-1:], "temp_MB_after_ctrl_c": before, "temp_MB_after_next_load": leftovers()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="SMALL: 30 train / 10 test JPEGs per class")
    parser.add_argument("--full-data-dir", type=Path, required=True, help="the 60,000 JPEGs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="png16,ulimit,rm_rf,compile_cache,decoders,cache_write")
    args = parser.parse_args()
    repo = args.repo.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="files-cases-"))
    cache = tmp / "cache"
    results: dict[str, object] = {"repo": str(repo)}
    wanted = args.cases.split(",")
    try:
        if "png16" in wanted:
            results["png16"] = case_png16(repo, tmp)
        if {"ulimit", "rm_rf"} & set(wanted):  # warm the compile and folder caches (only read from then on)
            results["warm_up_exit"] = finish(
                train(repo, cache, [*TINY, "--data-dir", str(args.data_dir), "--workdir", str(tmp / "w-warm")])
            )[0]
        for name, run in (
            ("ulimit", lambda: case_ulimit(repo, cache, args.data_dir, tmp)),
            ("rm_rf", lambda: case_rm_rf(repo, cache, args.data_dir, tmp)),
            ("compile_cache", lambda: case_compile_cache(repo, args.data_dir, tmp)),
            ("decoders", lambda: case_decoders_after_ctrl_c(repo, cache, args.full_data_dir, tmp)),
            ("cache_write", lambda: case_cache_write_ctrl_c(repo, args.full_data_dir, args.data_dir, tmp)),
        ):
            if name in wanted:
                results[name] = run()
                print(name, json.dumps(results[name]), flush=True)
    finally:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
