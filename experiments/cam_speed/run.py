"""Speed of jaxcifar.cam vs pytorch-grad-cam 1.5.7 on the same weights: 64 images, layer3, every method.

A kuangliu ResNet18 (jaxcifar.torch_resnet, --width, non-trivial BatchNorm state) and its jaxcifar
variables (jaxcifar.interop), float32, 64 random images, a target class per image. Per method: JAX's
first call (compile + run) apart, then --repeats timed calls (block_until_ready), and --repeats calls of
pytorch-grad-cam (a fresh explainer each, as a user calls it; its tqdm bars go to stderr); the median of
each. The maps of both sides are compared on the way (max |difference|; in float32 a ReLU input within
rounding of zero can flip, so this is a sanity check, not the equivalence test). Prints one line per
method and a JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from jaxcifar import backend, cam, interop, models
from jaxcifar.torch_resnet import make_resnet

CLASSES = {
    "gradcam": pgc.GradCAM,
    "hirescam": pgc.HiResCAM,
    "gradcamelementwise": pgc.GradCAMElementWise,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
    "fullgrad": pgc.FullGrad,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (default 16: layer3 has 64 channels).")
    parser.add_argument("--images", type=int, default=64, help="Images per call (default 64).")
    parser.add_argument("--layer", default="layer3", help="Target layer (default layer3).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per side and method (default 3).")
    parser.add_argument("--methods", default=",".join(CLASSES), help="Comma-separated methods (default: all).")
    parser.add_argument(
        "--conv-impl",
        choices=backend.CONV_IMPLS,
        default="lax",
        help="The JAX model's convolution (jaxcifar's --conv-impl; default lax, as models.get_model builds it).",
    )
    args = parser.parse_args()

    net = make_resnet("resnet18", width=args.width, seed=0).eval()
    variables = interop.load_torch_state_dict(net.state_dict(), "resnet18")
    conv = backend.conv_general_dilated(args.conv_impl)
    model = models.get_model("resnet18", width=args.width, conv_general_dilated=conv)
    x = torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    targets = [int(t) for t in np.random.default_rng(2).integers(0, 10, args.images)]
    record = {
        "width": args.width,
        "images": args.images,
        "layer": args.layer,
        "repeats": args.repeats,
        "conv_impl": args.conv_impl,
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "methods": {},
    }
    print(
        f"width {args.width}, {args.images} images, {args.layer}, conv {args.conv_impl}, load {record['load_before']}",
        flush=True,
    )
    for method in args.methods.split(","):

        def ours(method: str = method) -> np.ndarray:
            maps = cam.cam(model, variables, images, args.layer, method, targets=targets)
            return np.asarray(maps.block_until_ready())

        def theirs(method: str = method) -> np.ndarray:
            with CLASSES[method](model=net, target_layers=[getattr(net, args.layer)]) as explainer:
                return explainer(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])

        start = time.perf_counter()
        mine = ours()
        first = time.perf_counter() - start
        jax_times, torch_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours()
            jax_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            ref = theirs()
            torch_times.append(time.perf_counter() - start)
        jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
        diff = float(np.abs(mine - ref).max())
        record["methods"][method] = {
            "jax_first_call_s": first,
            "jax_s": jax_times,
            "torch_s": torch_times,
            "speedup_median": torch_s / jax_s,
            "max_abs_diff_float32": diff,
        }
        print(
            f"{method:19s} jax {jax_s:8.3f} s  pytorch-grad-cam {torch_s:8.3f} s  x{torch_s / jax_s:6.1f}"
            f"  (jax first call {first:6.1f} s; max |diff| {diff:.1e})",
            flush=True,
        )
    record["load_after"] = os.getloadavg()
    print(f"load after {record['load_after']}")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
