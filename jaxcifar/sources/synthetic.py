"""A synthetic, learnable stand-in for CIFAR (smoke runs and tests)."""

from __future__ import annotations

import numpy as np

from jaxcifar.sources.common import IMAGE_SIZE, Arrays


def make_synthetic(
    num_train: int = 2048, num_test: int = 512, num_classes: int = 10, seed: int = 0
) -> tuple[dict[str, Arrays], list[str]]:
    """A learnable toy problem: each class is a fixed smooth random color pattern plus pixel noise.

    Patterns are 4x4 color blocks upsampled to 32x32, so crops and flips keep them recognizable.
    Returns uint8 images; a small ResNet separates the classes within a few dozen steps.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    prototypes = coarse.repeat(IMAGE_SIZE // 4, axis=1).repeat(IMAGE_SIZE // 4, axis=2)
    out: dict[str, Arrays] = {}
    for split, n in (("train", num_train), ("test", num_test)):
        labels = (np.arange(n) % num_classes).astype(np.int32)
        rng.shuffle(labels)
        noise = rng.normal(0, 40, size=(n, IMAGE_SIZE, IMAGE_SIZE, 3))
        images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        out[split] = (images, labels)
    return out, [f"class_{i}" for i in range(num_classes)]
