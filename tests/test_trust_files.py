"""Files a run reads, writes and leaves behind: 16-bit PNGs decode to their own pixels (and the folder cache
of the old decoder is not served); a checkpoint write failing mid-run ends in one line; a truncated
compile-cache entry is replaced; an interrupt leaves no decoding process and no abandoned temporary cache
folder behind. Real processes where the fault needs one (``tests/test_chaos.py``'s launcher)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.compilation_cache import decompress_executable
from PIL import Image

from jaxcifar import backend, sources
from tests.test_chaos import Launch

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b")


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch) -> Path:
    """A JAXCIFAR_CACHE_DIR of the test's own (this process and the processes it starts)."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("JAXCIFAR_CACHE_DIR", str(cache))
    return cache


def _env(**changes: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **changes}


# ------------------------------------------------------------------------------------- 16-bit PNGs


def write_png16(path: Path, values: np.ndarray) -> None:
    """Writes uint16 ``values`` (H, W) grayscale or (H, W, 3) RGB as a 16-bit PNG (Pillow writes only the first)."""
    height, width = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def write_png16_folder(root: Path, per_class: int = 3) -> dict[str, np.ndarray]:
    """A train/test tree of 16-bit PNGs (grayscale, and every third one RGB) spanning 0..65535; returns the
    8-bit RGB images each split must decode to (the high byte of every value), in listing order."""
    rng = np.random.default_rng(16)
    expected: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split in expected:
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                shape = (32, 32, 3) if i % 3 == 2 else (32, 32)
                values = rng.integers(0, 65536, shape, dtype=np.uint16)
                write_png16(root / split / name / f"{i}.png", values)
                high = (values >> 8).astype(np.uint8)
                expected[split].append(high if high.ndim == 3 else np.repeat(high[..., None], 3, axis=2))
    return {split: np.stack(images) for split, images in expected.items()}


@pytest.mark.parametrize("workers", [1, 2])
def test_16_bit_pngs_decode_to_their_high_byte(tmp_path, workers):
    """Pillow opens a 16-bit grayscale PNG as mode I;16, and ``convert("RGB")`` clipped every value above
    255 to white. The serial decoder and the decoding processes both keep the high byte."""
    expected = write_png16_folder(tmp_path / "data")
    assert Image.open(tmp_path / "data" / "train" / "a" / "0.png").mode == "I;16"  # the case at hand
    arrays, names = sources.read_image_folder(tmp_path / "data", cache=False, workers=workers)
    assert names == list(CLASSES)
    for split in ("train", "test"):
        images, _ = arrays[split]
        chex.assert_shape(images, (2 * 3, 32, 32, 3))
        np.testing.assert_array_equal(images, expected[split])
    assert 0.4 < (arrays["train"][0] > 127).mean() < 0.6  # not white: half the values are in the upper half


def test_folder_cache_of_the_clipping_decoder_is_not_served(tmp_path, monkeypatch, private_cache):
    """An entry the old decoder stored (16-bit images clipped to white, cache format 1) is never read back:
    the decoding changed, so does the cache format, which names another entry."""
    expected = write_png16_folder(tmp_path / "data")
    listing, names = sources.list_image_folder(tmp_path / "data")
    clipped = {
        split: (np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files]), labels)
        for split, (files, labels) in listing.items()
    }
    assert (clipped["train"][0] != expected["train"]).mean() > 0.6  # what the old decoder stored: mostly 255
    with monkeypatch.context() as patch:
        patch.setattr(sources.cache, "FOLDER_CACHE_FORMAT", 1)
        old_entry = sources.folder_cache_entry(tmp_path / "data", listing, False)
        assert sources.write_folder_cache(old_entry, clipped, names, tmp_path / "data", False)
    arrays, _ = sources.read_image_folder(tmp_path / "data")
    for split in ("train", "test"):
        np.testing.assert_array_equal(arrays[split][0], expected[split])
    assert not old_entry.exists()  # replaced by the new format's entry, which serves the right pixels
    again, _ = sources.read_image_folder(tmp_path / "data")
    np.testing.assert_array_equal(again["train"][0], expected["train"])


# ------------------------------------------------------------------------ a checkpoint write that fails


def _closed_loop_error() -> RuntimeError:
    """The error tensorstore's threads meet after a failed orbax write: a callback into a closed loop."""
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        return e
    raise AssertionError("a closed loop took a callback")


class _RaisesWhenCollected:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __del__(self) -> None:
        raise self.error  # Python reports it to sys.unraisablehook, as tensorstore does its callbacks' errors


def test_a_checkpointer_drops_only_the_callbacks_into_a_closed_loop(tmp_path, monkeypatch):
    """Creating a Checkpointer makes ``sys.unraisablehook`` drop orbax's "Event loop is closed" (raised in
    ``call_soon_threadsafe``); every other unraisable error still reaches the hook that was there before."""
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
    from jaxcifar.checkpoint import Checkpointer

    Checkpointer(tmp_path / "run", asynchronous=False).close()
    Checkpointer(tmp_path / "run", asynchronous=False).close()  # installs the filter once
    other_closed = RuntimeError("Event loop is closed")  # same words, raised elsewhere: a real error
    errors = [_closed_loop_error(), ValueError("another"), other_closed]
    for error in errors:
        _RaisesWhenCollected(error)  # collected at once: its __del__ raises
    assert seen == errors[1:]


@pytest.mark.slow
def test_a_checkpoint_write_failing_mid_run_ends_in_one_line(tmp_path, chaos_env):
    """Files limited to 16 kB once the run has compiled (``ulimit -f`` on the running process): orbax's
    background write fails; tensorstore then calls back into orbax's closed event loop once per pending
    write, and each "Event loop is closed" reached stderr as a traceback (hundreds of lines) before the one
    correct line. Now that line is all. Slow: it compiles test_chaos's run (80 s alone on the loaded 2-core
    machine; the session's compilation cache shares the compile with test_chaos)."""
    launch = Launch(tmp_path / "run", chaos_env)
    deadline = time.monotonic() + 240
    while launch.alive() and not launch.printed("compile:") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert launch.alive(), launch.err[-5:]
    resource.prlimit(launch.pid, resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))
    assert launch.wait(timeout=240) == 1
    assert len(launch.err) == 1, f"{len(launch.err)} stderr lines, e.g. {launch.err[:3]}"
    assert launch.err[0].startswith("python -m jaxcifar.train: error: cannot save checkpoint ")
    assert launch.err[0].endswith(": File too large")


# -------------------------------------------------------------------------------- compile cache


_COMPILE = """import sys
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from jaxcifar import backend
backend.enable_compile_cache(sys.argv[1])
print(float(jax.jit(lambda x: (jnp.sin(x) * 2.0).sum())(jnp.arange(64.0))))
"""


def _compile(cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in _env().items() if not k.startswith("JAX_")}  # the cache --compile-cache sets
    return subprocess.run([sys.executable, "-c", _COMPILE, str(cache)], env=env, capture_output=True, text=True)


def test_repair_compile_cache_deletes_the_entries_that_do_not_decompress(tmp_path, caplog):
    """Real entries (this session's cache, conftest), one cut short: only that one goes, with one warning."""
    jax.jit(lambda x: jnp.cos(x) * 3.0)(jnp.ones(7))  # at least one entry in the session's cache
    cache = tmp_path / "xla"
    cache.mkdir()
    for path in sorted(Path(jax.config.jax_compilation_cache_dir).glob("*-cache"))[:3]:
        shutil.copy2(path, cache / path.name)
    entries = sorted(cache.glob("*-cache"))
    entries[0].write_bytes(entries[0].read_bytes()[:-1])
    (cache / entries[0].name.replace("-cache", "-atime")).write_bytes(bytes(8))
    with caplog.at_level("WARNING", logger="jaxcifar.backend"):
        assert backend.repair_compile_cache(cache) == [entries[0]]
    assert sorted(p for p in cache.iterdir() if not p.name.startswith(".")) == entries[1:]
    assert [r.getMessage() for r in caplog.records] == [
        f"compile cache: deleted 1 truncated entry in {cache} (a write cut short); its function compiles again"
    ]
    assert backend.repair_compile_cache(cache) == []
    for path in entries[1:]:
        decompress_executable(path.read_bytes())


@pytest.mark.slow
def test_a_truncated_compile_cache_entry_is_replaced(tmp_path):
    """A write cut short (full disk, ``ulimit -f``, a kill) leaves a truncated entry; JAX never writes over an
    existing one, so every later run warned and compiled again. Now the next run replaces it, and leaves
    the intact entries alone. Three processes that import JAX: about 20 s on the 2-core machine."""
    cache = tmp_path / "xla"
    first = _compile(cache)
    assert first.returncode == 0, first.stderr
    entries = {p: p.read_bytes() for p in cache.glob("*-cache")}
    assert entries
    cut = max(entries, key=lambda p: len(entries[p]))
    cut.write_bytes(entries[cut][: len(entries[cut]) // 2])
    others = {p: p.stat().st_mtime_ns for p in entries if p != cut}
    second = _compile(cache)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "Error reading persistent compilation cache" not in second.stderr, second.stderr
    assert decompress_executable(cut.read_bytes())  # compiled again and written anew
    assert {p: p.stat().st_mtime_ns for p in others} == others
    third = _compile(cache)
    assert third.returncode == 0 and third.stderr == ""


# ------------------------------------------------------------------------------ leftovers of a Ctrl-C


_DECODE = """import sys
from pathlib import Path
from jaxcifar import interrupts
interrupts.install("decoding")
from jaxcifar import sources
sources.decode_images([Path(p) for p in sys.argv[1:]], workers=2)
"""


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_decoding_processes_end_with_an_interrupted_parent(tmp_path, sig):
    """Ctrl-C ends a command with ``os._exit`` (no cleanup runs), ``kill -9`` likewise: its decoding processes
    decoded their whole share for nothing (seconds on a 60,000-image folder). Now they end with it. The
    second share ends with a named pipe, so its process is busy (reading it) for as long as the test likes."""
    write_png16_folder(tmp_path / "data", per_class=1)
    paths = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))
    fifo = tmp_path / "busy.png"
    os.mkfifo(fifo)
    parent = subprocess.Popen(
        [sys.executable, "-c", _DECODE, *paths, str(fifo)], env=_env(), stderr=subprocess.PIPE, text=True
    )
    writer = None
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while writer is None and time.monotonic() < deadline and parent.poll() is None:
            try:  # succeeds once the decoding process has opened the pipe: it now waits for bytes
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.01)
        assert writer is not None, "the decoding process never opened the pipe"
        workers = _children(parent.pid)
        assert len(workers) == 1 and _alive(workers[0])
        parent.send_signal(sig)
        assert parent.wait(timeout=30) == (130 if sig == signal.SIGINT else -signal.SIGKILL)
        deadline = time.monotonic() + 3
        while _alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(workers[0]), "the decoding process outlived its parent"
        if sig == signal.SIGINT:
            assert parent.stderr.read().startswith("decoding: interrupted:")
    finally:
        if writer is not None:
            os.close(writer)  # the old code's orphan then reads an empty file and ends
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
        parent.stderr.close()


_PAUSED_WRITE = """import sys, time
from jaxcifar import interrupts
interrupts.install("caching")
import numpy as np
from jaxcifar import sources
save = np.save
def save_then_pause(f, array, allow_pickle=False):
    save(f, array, allow_pickle=allow_pickle)
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
np.save = save_then_pause
sources.read_image_folder(sys.argv[1])
"""


def _temporaries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "folders").iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def test_an_interrupted_cache_write_is_cleaned_up_at_the_next_load(tmp_path, private_cache):
    """Ctrl-C during a folder-cache write left its hidden temporary folder (147 MB for CIFAR-10) until a later
    write an hour on. Now the next load deletes it, and never the folder of a write still under way."""
    expected = write_png16_folder(tmp_path / "data")
    writer = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_WRITE, str(tmp_path / "data")], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline() == "writing\n"
        (partial,) = _temporaries(private_cache)
        assert os.listdir(partial)
        arrays, _ = sources.read_image_folder(tmp_path / "data")  # while the other write is under way
        np.testing.assert_array_equal(arrays["train"][0], expected["train"])
        assert _temporaries(private_cache) == [partial]  # left alone: its writer lives
        writer.send_signal(signal.SIGINT)
        assert writer.wait(timeout=30) == 130
        assert partial.is_dir()
        arrays, _ = sources.read_image_folder(tmp_path / "data")
        np.testing.assert_array_equal(arrays["test"][0], expected["test"])
        assert _temporaries(private_cache) == []
        (entry,) = (private_cache / "folders").iterdir()
        assert json.loads((entry / "meta.json").read_text())["count"] == {"train": 6, "test": 6}
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
