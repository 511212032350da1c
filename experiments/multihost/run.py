"""Multi-host for real, on the shared CIFAR-10 images: two JAX processes x 4 CPU devices on localhost, started
as two hosts of a pod would be (``--distributed``, ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
``JAX_PROCESS_ID``), against one process with 8 devices; then kills, a hang and bad set-ups.

    python experiments/multihost/run.py [--out experiments/multihost/output.txt] [--kills 3]

Unpacks the first 128 train and 50 test images of every class of ../shared/data/cifar10-jpeg.tar.gz into a
temporary folder and trains ResNet18 width 8 for 2 epochs (batch 64: 20 steps per epoch). Prints what
each scenario shows (every process's output lines, exit codes, seconds), then one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.archive import first_per_class  # noqa: E402
from tests.test_multihost import AUDIT, ORBAX_OWN_PART, Proc, env_for, free_port, running_losses  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = {"train": 128, "test": 50}
FLAGS = dict(width=8, epochs=2, batch_size=64, eval_batch_size=200, lr=0.05, log_every=1)
STEPS = (1, 2, 3, 4, 5, 10, 20, 30, 40)  # where the running train losses are compared


def unpack(root: Path) -> Path:
    """The first PER_CLASS images of every split/class folder of the archive, in its own tree."""
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(root, members=first_per_class(tar, PER_CLASS), filter="data")
    return next(p for p in root.rglob("train") if p.is_dir()).parent


def argv(data: Path, workdir: Path, *extra: str, **changes: object) -> list[str]:
    args = [sys.executable, "-m", "jaxcifar.train", "--data-dir", str(data), "--workdir", str(workdir)]
    for key, value in {**FLAGS, **changes}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(extra)


def start(env: dict[str, str], args: list[str], processes: int = 2, port: int | None = None, **per) -> list[Proc]:
    port = port or free_port()
    return [
        Proc(per.get(f"argv{i}", args), {**env_for(env, port, i, processes), **per.get(f"env{i}", {})})
        for i in range(per.get("started", processes))
    ]


def wait(procs: list[Proc], timeout: float = 900) -> list[int]:
    return [p.wait(timeout) for p in procs]


def show(say, title: str, procs: list[Proc], codes: list[int], seconds: float) -> None:
    say(f"--- {title}: exit codes {codes}, {seconds:.1f}s")
    for i, p in enumerate(procs):
        for line in p.out:
            say(f"  process {i} stdout | {line}")
        for line in p.err:
            say(f"  process {i} stderr | {line}")


def metrics(workdir: Path) -> list[dict[str, float]]:
    history = json.loads((workdir / "history.json").read_text())
    return [{k: v for k, v in r.items() if k.endswith(("_loss", "_acc"))} for r in history]


def max_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("output.txt")))
    parser.add_argument("--kills", type=int, default=3, help="repetitions of the kill of process 0")
    args = parser.parse_args()
    out = open(args.out, "w")

    def say(text: str) -> None:
        print(text, flush=True)
        out.write(text + "\n")
        out.flush()

    import jax

    figures: dict[str, object] = {"jax": jax.__version__, "python": sys.version.split()[0]}
    tmp = Path(tempfile.mkdtemp(prefix="jaxcifar-multihost-"))
    data = unpack(tmp / "data")
    (tmp / "audit").mkdir()
    (tmp / "audit" / "sitecustomize.py").write_text(AUDIT)
    base = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla-cache"),
    }
    say(f"jax {jax.__version__}, Python {figures['python']}; data: {data} ({PER_CLASS} images per class)")
    say(f"flags: {FLAGS}")

    # 1. Two processes x 4 devices, --report, every Python-level write audited.
    run = tmp / "run"
    audit = {
        **base,
        "PYTHONPATH": f"{tmp / 'audit'}{os.pathsep}{REPO}",
        "JAXCIFAR_AUDIT_LOG": str(tmp / "writes"),
        "JAXCIFAR_AUDIT_ROOT": str(run),
    }
    t0 = time.monotonic()
    procs = start(audit, argv(data, run, "--distributed", "--report"))
    codes = wait(procs)
    figures["two_process_seconds"] = round(time.monotonic() - t0, 1)
    show(say, "2 processes x 4 devices, --distributed --report", procs, codes, time.monotonic() - t0)

    # 2. The same as one process with 8 devices (the same global batch of 64 split 8 ways), and with 4 devices
    # (the same again, split 4 ways: only the order of the float sums differs from 8 devices).
    reference = tmp / "reference"
    for n, workdir in ((8, reference), (4, tmp / "reference4")):
        t0 = time.monotonic()
        env = {**base, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        one = Proc(argv(data, workdir), env)
        show(say, f"1 process x {n} devices (reference)", [one], [one.wait(900)], time.monotonic() - t0)
        figures[f"one_process_{n}_devices_seconds"] = round(time.monotonic() - t0, 1)
    two, eight, four = (running_losses(w) for w in (run, reference, tmp / "reference4"))
    say("running train loss | 2 processes x 4 | 1 process x 8 | 1 process x 4 | |2x4 - 1x8| | |1x4 - 1x8|")
    for step in STEPS:
        say(f"step {step:>2} | {two[step]:.7f} | {eight[step]:.7f} | {four[step]:.7f} | "
            f"{abs(two[step] - eight[step]):.2e} | {abs(four[step] - eight[step]):.2e}")  # fmt: skip
    figures["running_loss_diff_2x4_vs_1x8"] = {s: abs(two[s] - eight[s]) for s in STEPS}
    figures["running_loss_diff_1x4_vs_1x8"] = {s: abs(four[s] - eight[s]) for s in STEPS}
    figures["max_abs_diff_vs_one_process"] = max_diff(metrics(run), metrics(reference))
    figures["max_abs_diff_4_vs_8_devices"] = max_diff(metrics(tmp / "reference4"), metrics(reference))
    say(f"history, 2 processes x 4: {json.dumps(metrics(run))}")
    say(f"history, 1 process x 8:   {json.dumps(metrics(reference))}")
    say(f"history, 1 process x 4:   {json.dumps(metrics(tmp / 'reference4'))}")
    say(
        "largest |difference| of an epoch's loss or accuracy: "
        f"2x4 vs 1x8 {figures['max_abs_diff_vs_one_process']:.3g}, "
        f"1x4 vs 1x8 {figures['max_abs_diff_4_vs_8_devices']:.3g}"
    )

    # 3. Who wrote what (Python-level writes: jaxcifar's files, orbax's metadata).
    for i in range(2):
        log = tmp / f"writes.{i}"
        lines = log.read_text().splitlines() if log.exists() else []
        names = sorted(
            {
                Path(line.split(" ", 1)[1]).relative_to(run).parts[0]
                for line in lines
                if line.split(" ", 1)[1] != str(run)
            }
        )
        stray = [line for line in lines if i == 1 and not ORBAX_OWN_PART.search(line)]
        say(f"process {i}: {len(lines)} Python-level writes in the workdir, under: {', '.join(names)}")
        if i == 1:
            say(f"process 1: writes outside its own part of the orbax checkpoints: {stray or 'none'}")
            figures["process1_stray_writes"] = len(stray)
    parts = sorted(str(p.relative_to(run)) for p in run.glob("*/*/state/ocdbt.process_*"))
    say(f"orbax's per-process parts of the committed checkpoints (tensorstore, C++): {parts}")

    # 4. A finished run, resumed.
    t0 = time.monotonic()
    procs = start(base, argv(data, run, "--distributed", "--resume"))
    show(say, "finished run resumed", procs, wait(procs), time.monotonic() - t0)

    # 5. kill -9 of process 1 in epoch 2, then --resume with both.
    killed_run = tmp / "killed"
    procs = start(base, argv(data, killed_run, "--distributed"))
    procs[0].wait_for_line("epoch 1/2 ", timeout=900)
    time.sleep(3.0)
    procs[1].process.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    code = procs[0].wait(120)
    figures["kill_process1_survivor_seconds"] = round(time.monotonic() - t0, 2)
    show(say, f"kill -9 process 1 in epoch 2: process 0 ended {time.monotonic() - t0:.2f}s later", procs,
         [code, procs[1].wait(10)], time.monotonic() - t0)  # fmt: skip
    t0 = time.monotonic()
    procs = start(base, argv(data, killed_run, "--distributed", "--resume"))
    show(say, "both resumed", procs, wait(procs), time.monotonic() - t0)
    figures["max_abs_diff_resumed_vs_uninterrupted"] = max_diff(metrics(killed_run), metrics(run))
    say(f"resumed vs uninterrupted, largest |difference|: {figures['max_abs_diff_resumed_vs_uninterrupted']:.3g}")

    # 6. kill -9 of process 0 (it runs JAX's coordination service), repeated.
    outcomes = []
    for rep in range(args.kills):
        procs = start(base, argv(data, tmp / f"killed0-{rep}", "--distributed"))
        procs[0].wait_for_line("epoch 1/2 ", timeout=900)
        time.sleep(3.0)
        procs[0].process.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        code = procs[1].wait(120)
        seconds = time.monotonic() - t0
        outcomes.append({"exit_code": code, "seconds": round(seconds, 2), "stderr_lines": len(procs[1].err)})
        show(say, f"kill -9 process 0 ({rep + 1}/{args.kills}): process 1 ended {seconds:.2f}s later", procs,
             [procs[0].wait(10), code], seconds)  # fmt: skip
    figures["kill_process0"] = outcomes

    # 7. Process 1 hangs (SIGSTOP): process 0 gives it up after JAXCIFAR_DISTRIBUTED_PEER_TIMEOUT.
    hang = {**base, "JAXCIFAR_DISTRIBUTED_PEER_TIMEOUT": "10"}
    procs = start(hang, argv(data, tmp / "hang", "--distributed"))
    procs[0].wait_for_line("epoch 1/2 ", timeout=900)
    procs[1].process.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    code = procs[0].wait(120)
    figures["hang_survivor_seconds"] = round(time.monotonic() - t0, 1)
    procs[1].process.send_signal(signal.SIGKILL)
    show(say, f"process 1 stopped (SIGSTOP), peer timeout 10 s: process 0 ended {time.monotonic() - t0:.1f}s later",
         procs, [code, procs[1].wait(10)], time.monotonic() - t0)  # fmt: skip

    # 8. Bad set-ups.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        t0 = time.monotonic()
        procs = start({**base, "JAXCIFAR_DISTRIBUTED_INIT_TIMEOUT": "10"}, argv(data, tmp / "busy", "--distributed"),
                      port=port)  # fmt: skip
        show(say, "coordinator port held by another program", procs, wait(procs), time.monotonic() - t0)
    t0 = time.monotonic()
    procs = start({**base, "JAXCIFAR_DISTRIBUTED_INIT_TIMEOUT": "10"}, argv(data, tmp / "count", "--distributed"),
                  processes=3, started=2)  # fmt: skip
    show(say, "JAX_NUM_PROCESSES=3, 2 started, init timeout 10 s", procs, wait(procs), time.monotonic() - t0)
    t0 = time.monotonic()
    same_id = {"env1": {"JAX_PROCESS_ID": "0"}}
    procs = start({**base, "JAXCIFAR_DISTRIBUTED_INIT_TIMEOUT": "10"}, argv(data, tmp / "ids", "--distributed"),
                  **same_id)  # fmt: skip
    show(say, "both started with JAX_PROCESS_ID=0, init timeout 10 s", procs, wait(procs), time.monotonic() - t0)
    t0 = time.monotonic()
    procs = start(base, argv(data, tmp / "mismatch", "--distributed"),
                  argv1=argv(data, tmp / "mismatch", "--distributed", lr=0.1, epochs=3))  # fmt: skip
    show(say, "process 1 started with --lr 0.1 --epochs 3", procs, wait(procs), time.monotonic() - t0)

    say(json.dumps(figures))
    out.close()


if __name__ == "__main__":
    main()
