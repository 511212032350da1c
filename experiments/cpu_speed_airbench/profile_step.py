"""Where one jitted train step's time goes, per XLA operation: a ``jax.profiler`` trace of ``--steps`` train
steps of a model at batch 512, its events summed by name (the XLA thunks: fusions, convolutions, dots) with
``jax.profiler.ProfileData`` (no TensorBoard needed). Prints the top operations with their total ms per step
and share; convolutions also with their HLO shapes.

    python experiments/cpu_speed_airbench/profile_step.py --model airbench --conv auto --steps 2
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile

import jax
import optax

from jaxcifar import backend, models, optim, steps
from jaxcifar.config import Config
from jaxcifar.data import NORMALIZATION
from jaxcifar.measure import random_batch
from jaxcifar.state import create_train_state


def xla_options(name: str) -> dict[str, str]:
    """backend.compiler_options(name) for eigen/ynnpack; "dot-only": YNNPACK for dots only (reductions to XLA)."""
    if name == "dot-only":
        return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    return backend.compiler_options(name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="airbench")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--conv", default="auto")
    p.add_argument("--xla", default="eigen")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--hlo", default="", help="also write the optimized HLO text of the step to this file")
    args = p.parse_args()
    config = Config(model=args.model, batch_size=args.batch_size)
    conv = backend.conv_general_dilated(args.conv, jax.devices()[:1])
    model = models.get_model(args.model, num_classes=10, width=args.width, conv_general_dilated=conv)
    state = create_train_state(model, optim.make_optimizer(config, optax.constant_schedule(0.01)), seed=0)
    images, labels = random_batch(args.batch_size)
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    mean, std = NORMALIZATION["cifar10"]
    step = steps.make_train_step(mean, std, "crop-flip", xla_options=xla_options(args.xla))
    compiled = step.lower(state, batch).compile()
    hlo = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    tmp = tempfile.mkdtemp()
    with jax.profiler.trace(tmp):
        for _ in range(args.steps):
            state, m = compiled(state, batch)
            jax.block_until_ready((state, m))
    path = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    names = set(re.findall(r"%([\w.\-]+) = ", hlo))  # XLA op events: instruction names of the optimized HLO
    ops: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in names:
                    ops[ev.name] += ev.duration_ns / 1e6 / args.steps
                elif ev.name.startswith("PjitFunction"):
                    ops["(whole step)"] += ev.duration_ns / 1e6 / args.steps
    whole = ops.pop("(whole step)", 0.0)
    total = sum(ops.values())
    print(
        f"{args.model} B={args.batch_size} conv={args.conv} xla={args.xla}: step {whole:.0f} ms,"
        f" XLA ops {total:.0f} ms/step"
    )
    lines = {m.group(1): m.group(0) for m in re.finditer(r"%([\w.\-]+) = ([^\n]*)", hlo)}
    kinds: collections.Counter = collections.Counter()
    for name, ms in ops.items():
        desc = lines.get(name, "")
        if "convolution(" in desc or name.startswith("convolution"):
            kinds["convolution (Eigen)"] += ms
        elif "__ynn_fusion" in desc or name.startswith("ynn_fusion"):
            kinds["YNNPACK fusion (dots, reductions)"] += ms
        elif "reduce-window" in name or "scatter" in name or "iota" in name:
            kinds["reduce-window / scatter / iota"] += ms
        elif "concatenate" in name or "copy" in name or "transpose" in name or "slice" in name or "pad" in name:
            kinds["data movement (concatenate, copy, transpose, slice, pad)"] += ms
        else:
            kinds["other fusions (elementwise: BN, GELU, ...)"] += ms
    for kind, ms in kinds.most_common():
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {kind}")
    for name, ms in ops.most_common(args.top):
        desc = lines.get(name, "")
        shape = re.search(r"= (\S+)", desc)
        kind = "conv" if "convolution(" in desc or name.startswith("convolution") else ""
        print(f"{ms:8.1f} ms {100 * ms / total:5.1f}%  {name[:40]:40s} {kind:4s} {shape.group(1) if shape else ''}")


if __name__ == "__main__":
    main()
