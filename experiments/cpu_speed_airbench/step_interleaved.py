"""Train-step speed of a fast model (airbench / resnet9), JAX vs its PyTorch twin, measured INTERLEAVED.

Each round times one JAX train step per variant and one PyTorch (eager, channels_last) train step, back to
back, so both see the same contention on the shared 2-core machine. Each side runs in its own worker
process (spawned once, driven over a pipe, a short pause between steps): in one process, the idle
thread pools of one library spun while the other ran (PyTorch alone 2.2-2.4 s/step, 3.1-5.7 s
interleaved with JAX in the same process). Prints, per variant,
the median ms/step and the per-round ratio torch_ms / jax_ms (median, min, max): >1 means JAX is faster.

The JAX step is jaxcifar's own (steps.make_train_step, crop-flip, SGD Nesterov, backend.compiler_options);
the PyTorch step mirrors jaxcifar.bench's (crop-flip on the device, SGD Nesterov + weight decay).

    python experiments/cpu_speed_airbench/step_interleaved.py --model airbench --variants auto,lax --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcifar import backend, models, optim, steps, torch_fast
from jaxcifar.config import Config
from jaxcifar.data import NORMALIZATION
from jaxcifar.measure import random_batch
from jaxcifar.state import create_train_state
from jaxcifar.torch_bench import CROP_PADDING, torch_crop_flip


def xla_options(name: str) -> dict[str, str]:
    """backend.compiler_options(name) for eigen/ynnpack; "dot-only": YNNPACK for dots only (reductions to XLA)."""
    if name == "dot-only":
        return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    return backend.compiler_options(name)


def conv_variant(name: str):
    """Returns the conv_general_dilated for a variant name: a backend impl (auto, lax, matmul)."""
    return backend.conv_general_dilated(name, jax.devices()[:1])


def jax_step(model_name: str, batch_size: int, variant: str, images, labels, xla: str):
    impl, _, xla_name = variant.partition("@")  # e.g. "auto@dot-only", "auto+flaxpool"
    xla = xla_name or xla
    if impl.endswith("+flaxpool"):  # this worker process only: the models' max-pool as before (flax's)
        impl = impl.removesuffix("+flaxpool")
        from jaxcifar.models import airbench, resnet9

        def flax_pool(x, size):
            return nn.max_pool(x, (size, size), strides=(size, size))

        airbench.max_pool = resnet9.max_pool = flax_pool
    if impl.endswith("+reshapepool"):  # the max over a reshape with jnp.max's own gradient (split among ties)
        impl = impl.removesuffix("+reshapepool")
        from jaxcifar.models import airbench, resnet9

        def reshape_pool(x, size):
            b, h, w, c = x.shape
            x = x[:, : h // size * size, : w // size * size, :].reshape(b, h // size, size, w // size, size, c)
            return jnp.max(x, axis=(2, 4))

        airbench.max_pool = resnet9.max_pool = reshape_pool
    config = Config(model=model_name, batch_size=batch_size, conv_impl="lax", augment="crop-flip")
    model = models.get_model(model_name, num_classes=10, width=64, conv_general_dilated=conv_variant(impl))
    tx = optim.make_optimizer(config, optax.constant_schedule(0.01))
    state = create_train_state(model, tx, seed=0)
    mean, std = NORMALIZATION["cifar10"]
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    options = xla_options(xla)
    t0 = time.perf_counter()
    step = steps.make_train_step(mean, std, "crop-flip", xla_options=options).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    return run, compile_s


def torch_step(model_name: str, batch_size: int, images, labels):
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torch_fast.twin(model_name, 10, 64).to(memory_format=torch.channels_last)
    config = Config()
    opt = torch.optim.SGD(
        model.parameters(),
        lr=0.01,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    images_t = torch.from_numpy(images)
    y = torch.from_numpy(labels.astype(np.int64))
    gen = torch.Generator()
    gen.manual_seed(0)

    def run() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (batch_size, 2), generator=gen)
        flip = torch.randint(0, 2, (batch_size,), generator=gen).bool()
        x = torch_crop_flip(torch, images_t, offsets, flip).permute(0, 3, 1, 2).float().div_(255.0)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return run


def worker(conn, kind: str, model_name: str, batch_size: int, variant: str, xla: str) -> None:
    images, labels = random_batch(batch_size)
    if kind == "torch":
        run, compile_s = torch_step(model_name, batch_size, images, labels), 0.0
    else:
        run, compile_s = jax_step(model_name, batch_size, variant, images, labels, xla)
    run()  # warm-up
    conn.send(compile_s)
    while conn.recv():
        conn.send(timed(run))


def timed(run) -> float:
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="airbench")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--variants", default="auto", help="conv variants (auto, lax, matmul), each optionally @xla")
    p.add_argument("--xla", default="eigen", help="eigen, ynnpack or dot-only")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    variants = args.variants.split(",")
    ctx = multiprocessing.get_context("spawn")
    conns = {}
    for kind, v in [("torch", "")] + [("jax", v) for v in variants]:
        parent, child = ctx.Pipe()
        ctx.Process(target=worker, args=(child, kind, args.model, args.batch_size, v, args.xla), daemon=True).start()
        print(f"ready {kind} {v}: compile {parent.recv():.1f} s", flush=True)  # one at a time: no overlap
        conns[v or "torch"] = parent

    def remote(name: str) -> float:
        time.sleep(0.3)
        conns[name].send(True)
        return conns[name].recv()

    trun = functools.partial(remote, "torch")
    runs = {v: functools.partial(remote, v) for v in variants}
    jax_ms = {v: [] for v in variants}
    torch_ms = []
    ratios = {v: [] for v in variants}
    for i in range(args.rounds):
        t = trun()
        torch_ms.append(t)
        for v in variants:
            j = runs[v]()
            jax_ms[v].append(j)
            ratios[v].append(t / j)
        line = " ".join(f"{v}={jax_ms[v][-1]:.0f}" for v in variants)
        print(f"round {i}: torch={t:.0f} ms {line}", flush=True)
    bs = args.batch_size
    med_t = statistics.median(torch_ms)
    print(f"{args.model} batch {bs} xla={args.xla}: torch {med_t:.0f} ms/step ({bs / med_t * 1000:.0f} img/s)")
    for v in variants:
        m = statistics.median(jax_ms[v])
        rs = ratios[v]
        print(
            f"  jax[{v}] {m:.0f} ms/step ({bs / m * 1000:.0f} img/s);"
            f" torch/jax ratio median {statistics.median(rs):.2f}"
            f" (min {min(rs):.2f}, max {max(rs):.2f}, {len(rs)} rounds)"
        )
    for c in conns.values():
        c.send(False)


if __name__ == "__main__":
    main()
