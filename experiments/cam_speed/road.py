"""Time of ROAD's imputation (jaxcifar.cam_metrics.impute) and of ROAD itself, against pytorch-grad-cam 1.5.7.

Random images (B, 32, 32, 3) and random maps; the kept pixels are each map below its 80th percentile
(ROADMostRelevantFirst's default). Records, each timed apart: the first jitted call of ``impute``
(compile + run), --repeats further calls (block_until_ready), pytorch-grad-cam's NoisyLinearImputer
(scipy spsolve, noise 0) on the same images and masks, the largest difference of the imputed images;
then ``cam_metrics.road_average`` (9 percentiles, one model forward per percentile) with a width-16
ResNet18, first call and repeats. Prints one JSON record with the load average before and after.
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

from jaxcifar import cam_metrics, models


def _timed(fn, repeats: int) -> tuple[float, list[float], object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10, help="Images per call (default 10).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls after the first (default 3).")
    parser.add_argument("--no-torch", action="store_true", help="Skip pytorch-grad-cam's imputer.")
    parser.add_argument("--no-road", action="store_true", help="Skip road_average with the model.")
    args = parser.parse_args()
    record: dict[str, object] = {"images": args.images, "load_before": os.getloadavg()}
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.images, 32, 32, 3)).astype(np.float32)
    maps = rng.uniform(size=(args.images, 32, 32)).astype(np.float32)
    keep = np.asarray(cam_metrics.road_keep(jnp.asarray(maps), 80.0, True))

    impute = jax.jit(cam_metrics.impute)
    first, times, ours = _timed(lambda: impute(jnp.asarray(images), jnp.asarray(keep)), args.repeats)
    record["impute_first_s"], record["impute_s"] = first, times
    print(f"impute: first call {first:.2f} s, median of {args.repeats} {statistics.median(times):.3f} s", flush=True)

    if not args.no_torch:
        import torch
        from pytorch_grad_cam.metrics.road import NoisyLinearImputer

        imputer = NoisyLinearImputer(noise=0.0)
        start = time.perf_counter()
        theirs = np.stack(
            [
                imputer(torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(k.astype(np.float32)))
                .numpy()
                .transpose(1, 2, 0)
                for image, k in zip(images, keep, strict=True)
            ]
        )
        record["torch_impute_s"] = time.perf_counter() - start
        record["max_abs_difference"] = float(np.abs(np.asarray(ours) - theirs).max())
        print(
            f"pytorch-grad-cam NoisyLinearImputer: {record['torch_impute_s']:.3f} s; "
            f"max |difference| {record['max_abs_difference']:.2e}",
            flush=True,
        )

    if not args.no_road:
        model = models.get_model("resnet18", width=16)
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
        first, times, _ = _timed(
            lambda: cam_metrics.road_average(model, variables, jnp.asarray(images), jnp.asarray(maps)), args.repeats
        )
        record["road_average_first_s"], record["road_average_s"] = first, times
        print(
            f"road_average (9 percentiles, width 16): first call {first:.2f} s, "
            f"median of {args.repeats} {statistics.median(times):.3f} s",
            flush=True,
        )
    record["load_after"] = os.getloadavg()
    print(json.dumps(record))


if __name__ == "__main__":
    main()
