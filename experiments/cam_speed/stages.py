"""Where the time of one CAM call goes, jaxcifar vs pytorch-grad-cam 1.5.7, 64 images, layer3, one method.

Same setup as run.py (kuangliu ResNet18 at --width, seed 0, its jaxcifar variables, float32, 64 random
images, a random target per image, --conv-impl auto). Stages, each timed --repeats times in rotation
(interleaved, so that a change of load hits every stage alike), median reported:

- jax ``cam()``: the whole library call, checks included, ending with ``block_until_ready``;
- jax compiled: the same computation as an ahead-of-time compiled executable (no Python around it);
- jax forward: the model's eval forward alone (jitted), logits only;
- torch pytorch-grad-cam: ``with CLASS(model, [layer]) as c: c(input_tensor, targets)``;
- torch forward: ``net(x)`` with autograd on (as pytorch-grad-cam runs it);
- torch forward + backward: ``net(x)``, the sum of the target logits, ``backward()`` (parameters
  require grad, the input does not: what pytorch-grad-cam's gradient methods run).

Work per image (multiply-adds): torch's from its Conv2d/Linear shapes (all taps, padding included);
XLA's from ``cost_analysis()`` of the compiled executables (flops / 2; counts only taps inside the
image, so a few % below). Prints a table and a JSON record (with the load average before and after).
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
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from run import CLASSES  # run.py in this folder

from jaxcifar import backend, cam, gradcam, interop, models
from jaxcifar.torch_resnet import make_resnet


def torch_macs(net: torch.nn.Module, x: torch.Tensor, layer: str) -> dict[str, float]:
    """Forward multiply-adds per image of every Conv2d/Linear, split as: all, the stem conv, ``layer``'s
    successors (the convs whose input gradient a gradient to ``layer`` needs), and up to ``layer``."""
    macs: dict[str, float] = {}

    def hook(name: str):
        def record(module, inputs, output):
            per_out = (
                module.in_features
                if isinstance(module, torch.nn.Linear)
                else (module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1])
            )
            macs[name] = output[0].numel() * per_out

        return record

    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    with torch.no_grad():
        net(x[:1])
    for h in handles:
        h.remove()
    names = list(macs)
    total = sum(macs.values())
    order = ["conv1", "layer1", "layer2", "layer3", "layer4", "linear"]
    after = order[order.index(layer) + 1 :]
    successors = sum(v for n, v in macs.items() if n.split(".")[0] in after)
    return {"all": total, "stem": macs[names[0]], "after_layer": successors, "up_to_layer": total - successors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (default 16).")
    parser.add_argument("--layer", default="layer3", help="Target layer (default layer3).")
    parser.add_argument("--method", default="gradcam", choices=list(CLASSES), help="CAM method (default gradcam).")
    parser.add_argument("--repeats", type=int, default=7, help="Timed rounds (default 7).")
    args = parser.parse_args()
    net = make_resnet("resnet18", width=args.width, seed=0).eval()
    variables = gradcam._model_variables(interop.load_torch_state_dict(net.state_dict(), "resnet18"))
    model = models.get_model("resnet18", width=args.width, conv_general_dilated=backend.conv_general_dilated("auto"))
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    targets = [int(t) for t in np.random.default_rng(2).integers(0, 10, 64)]
    target_array = jnp.asarray(targets, jnp.int32)
    static = (model, args.layer, args.method, "logit", False, False, cam.DEFAULT_BATCH_SIZE)
    options = backend.compiler_options()
    compiled = (
        jax.jit(lambda v, im, t: cam._cam_impl(*static, v, im, t), compiler_options=options)
        .lower(variables, images, target_array)
        .compile()
    )
    forward = jax.jit(lambda v, im: model.apply(v, im, train=False), compiler_options=options)
    forward = forward.lower(variables, images).compile()

    def flops(executable) -> float:
        analysis = executable.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return float(analysis.get("flops", 0.0)) / 2 / 64

    torch_targets = torch.as_tensor(targets)

    def torch_backward() -> None:
        net.zero_grad()
        out = net(x)
        out[torch.arange(64), torch_targets].sum().backward()

    def theirs() -> None:
        with CLASSES[args.method](model=net, target_layers=[getattr(net, args.layer)]) as explainer:
            explainer(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])

    stages = {
        "jax cam()": lambda: cam.cam(
            model, variables, images, args.layer, args.method, targets=targets
        ).block_until_ready(),
        "jax compiled": lambda: compiled(variables, images, target_array).block_until_ready(),
        "jax forward": lambda: forward(variables, images).block_until_ready(),
        "torch pytorch-grad-cam": theirs,
        "torch forward": lambda: net(x),
        "torch forward+backward": torch_backward,
    }
    load_before = os.getloadavg()
    for stage in stages.values():  # warm up (compiles, oneDNN primitive caches)
        stage()
    times: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(args.repeats):
        for name, stage in stages.items():
            start = time.perf_counter()
            stage()
            times[name].append(time.perf_counter() - start)
    macs = torch_macs(net, x, args.layer)
    record = {
        "width": args.width,
        "layer": args.layer,
        "method": args.method,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "torch_macs_per_image": macs,
        "xla_macs_per_image": {"cam": flops(compiled), "forward": flops(forward)},
        "times_s": times,
    }
    print(f"width {args.width}, 64 images, {args.layer}, {args.method}; load {load_before} -> {record['load_after']}")
    print(
        f"torch forward MMAC/image {macs['all'] / 1e6:.1f} (stem {macs['stem'] / 1e6:.2f}, after {args.layer} "
        f"{macs['after_layer'] / 1e6:.1f}); XLA: forward {flops(forward) / 1e6:.1f}, cam {flops(compiled) / 1e6:.1f}"
    )
    for name, values in times.items():
        print(f"{name:24s} {statistics.median(values) * 1e3:9.1f} ms  (min {min(values) * 1e3:.1f})")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
