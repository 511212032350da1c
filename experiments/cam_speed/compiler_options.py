"""The gradcam executable (64 images, layer3) with XLA's Eigen or YNNPACK convolutions
(``backend.compiler_options``) and the ``lax`` or ``auto`` convolution gradients, timed interleaved.

Usage: ``compiler_options.py WIDTH ROUNDS``. Prints the median and minimum of each and the load average.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar import backend, cam, gradcam, interop, models
from jaxcifar.torch_resnet import make_resnet


def main() -> None:
    width, rounds = int(sys.argv[1]), int(sys.argv[2])
    net = make_resnet("resnet18", width=width, seed=0).eval()
    variables = gradcam._model_variables(interop.load_torch_state_dict(net.state_dict(), "resnet18"))
    images = jnp.asarray(np.random.default_rng(1).normal(size=(64, 32, 32, 3)).astype(np.float32))
    targets = jnp.asarray(np.random.default_rng(2).integers(0, 10, 64), jnp.int32)
    executables = {}
    for impl in ("lax", "auto"):
        model = models.get_model("resnet18", width=width, conv_general_dilated=backend.conv_general_dilated(impl))
        static = (model, "layer3", "gradcam", "logit", False, False, cam.DEFAULT_BATCH_SIZE)
        for conv in ("eigen", "ynnpack"):
            jitted = jax.jit(
                lambda v, im, t, static=static: cam._cam_impl(*static, v, im, t),
                compiler_options=backend.compiler_options(conv),
            )
            executables[f"{impl}/{conv}"] = jitted.lower(variables, images, targets).compile()
    times: dict[str, list[float]] = {name: [] for name in executables}
    print("load", os.getloadavg())
    for _ in range(rounds):
        for name, executable in executables.items():
            executable(variables, images, targets).block_until_ready()
            start = time.perf_counter()
            executable(variables, images, targets).block_until_ready()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(name, f"median {statistics.median(values) * 1e3:.1f} ms min {min(values) * 1e3:.1f}")
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()
