"""Lowering, compile and run times of ``jaxcifar.cam_metrics.impute`` apart, B random 32x32x3 images.

Usage: impute_calls.py B [RUNS]. The kept pixels are each random map below its 80th percentile.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar import cam_metrics

batch, runs = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2
rng = np.random.default_rng(0)
images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)).astype(np.float32))
keep = cam_metrics.road_keep(jnp.asarray(rng.uniform(size=(batch, 32, 32)).astype(np.float32)), 80.0, True)
start = time.perf_counter()
lowered = jax.jit(cam_metrics.impute).lower(images, keep)
print(f"lower {time.perf_counter() - start:.2f} s", flush=True)
start = time.perf_counter()
compiled = lowered.compile()
print(f"compile {time.perf_counter() - start:.2f} s", flush=True)
for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(images, keep))
    print(f"run {time.perf_counter() - start:.4f} s", flush=True)
