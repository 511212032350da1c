"""The network of airbench94 (Keller Jordan, KellerJordan/cifar10-airbench ``legacy/airbench94.py``), NHWC.

whiten: a 2x2 convolution (no padding: 32x32 -> 31x31) with 24 filters and a bias, then GELU. Its
filters are not learned: ``params_from_data`` computes them from the training images (the
eigenvectors of the 2x2x3 patch second-moment matrix, each divided by sqrt(eigenvalue + 5e-4), and
their negatives), and the optimizer keeps them frozen (``jaxcifar.optim``); only its bias trains,
and only for the first ``--whiten-bias-epochs`` epochs.
block1..block3 (``width``, 4 x width, 4 x width channels: 64/256/256): conv -> 2x2 max-pool -> BN ->
GELU -> conv -> BN -> GELU (31 -> 15 -> 7 -> 3 pixels); then a 3x3 max-pool (1x1), a Dense layer
without bias and the logits multiplied by 1/9.
Convolutions are 3x3 with padding 1 and no bias, initialized as PyTorch does and then "dirac": the
first min(C_in, C_out) filters are the identity. BatchNorm has no scale, eps 1e-12 and keeps 0.6 of
its running statistics per step (PyTorch momentum 0.4). GELU is the exact (erf) one, as PyTorch's.

Modules: ``whiten``, ``group1``..``group3`` (each ``conv1``, ``norm1``, ``conv2``, ``norm2``), ``linear``.
Their outputs are sown and perturbed as ``block1``..``block3`` (15x15, 7x7, 3x3); ``block2`` is the
Grad-CAM layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcifar.models.conv import max_pool
from jaxcifar.models.resnet9 import TORCH_DEFAULT_INIT

WHITEN_KERNEL = 2
WHITEN_WIDTH = 2 * 3 * WHITEN_KERNEL**2  # the eigenvectors of the 12-dim patch space and their negatives
WHITEN_EPS = 5e-4
WHITEN_IMAGES = 5000  # training images the patch statistics come from (airbench94: the first 5,000)
BN_MOMENTUM = 0.6  # Flax's momentum: the share of the old running value (PyTorch momentum 1 - 0.6)
BN_EPSILON = 1e-12
LOGIT_SCALE = 1.0 / 9.0


def dirac_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """PyTorch's default conv init, then ``torch.nn.init.dirac_`` on the first min(C_in, C_out) output
    filters: filter i is 1 at the centre tap of input channel i, 0 elsewhere. Returns an HWIO kernel of ``shape``."""
    kernel = TORCH_DEFAULT_INIT(key, shape, dtype)
    kh, kw, c_in, c_out = shape
    n = min(c_in, c_out)
    identity = jnp.zeros((kh, kw, c_in, n), dtype).at[kh // 2, kw // 2, jnp.arange(n), jnp.arange(n)].set(1)
    return kernel.at[..., :n].set(identity)


def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU, x * Phi(x) (PyTorch's ``nn.GELU()``; flax's default is the tanh approximation)."""
    return nn.gelu(x, approximate=False)


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU. (B, H, W, C) -> (B, H // 2, W // 2, features)."""

    features: int
    dtype: Any = jnp.float32
    conv_general_dilated: Callable[..., Any] = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = functools.partial(
            nn.Conv,
            self.features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=dirac_init,
            dtype=self.dtype,
            conv_general_dilated=self.conv_general_dilated,
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            use_scale=False,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
        )
        x = conv(name="conv1")(x)
        x = max_pool(x, 2)
        x = gelu(norm(name="norm1")(x))
        x = conv(name="conv2")(x)
        return gelu(norm(name="norm2")(x))


class AirbenchNet(nn.Module):
    """airbench94's network. ``apply(variables, x, train)`` maps (B, 32, 32, 3) images to (B, num_classes)
    logits (float32 for float32/bfloat16/float16 compute). ``width`` is block1's channel count (64);
    block2 and block3 have 4 x width. Train it with the whitening filters from ``params_from_data``."""

    num_classes: int = 10
    width: int = 64
    dtype: Any = jnp.float32
    conv_general_dilated: Callable[..., Any] = lax.conv_general_dilated

    gradcam_layer: ClassVar[str] = "block2"  # 7x7 on 32x32 inputs (block3 is 3x3)
    frozen_params: ClassVar[tuple[str, ...]] = ("whiten/kernel",)  # the optimizer never updates these
    early_params: ClassVar[tuple[str, ...]] = ("whiten/bias",)  # trained for --whiten-bias-epochs only
    cpu_auto_conv: ClassVar[str] = "lax"  # --conv-impl auto on one CPU (models.cpu_auto_conv): measured faster

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(
            WHITEN_WIDTH,
            (WHITEN_KERNEL, WHITEN_KERNEL),
            padding="VALID",
            kernel_init=TORCH_DEFAULT_INIT,  # replaced by params_from_data before training
            dtype=self.dtype,
            conv_general_dilated=self.conv_general_dilated,
            name="whiten",
        )(x)
        x = gelu(x)
        for k, features in enumerate((self.width, 4 * self.width, 4 * self.width), start=1):
            x = ConvGroup(features, self.dtype, self.conv_general_dilated, name=f"group{k}")(x, train)
            name = f"block{k}"
            x = self.perturb(name, x)
            self.sow("intermediates", name, x)
        x = max_pool(x, 3)
        x = x.reshape(x.shape[0], -1).astype(jnp.promote_types(x.dtype, jnp.float32))
        x = nn.Dense(self.num_classes, use_bias=False, kernel_init=TORCH_DEFAULT_INIT, dtype=self.dtype, name="linear")(
            x
        )
        return (x * LOGIT_SCALE).astype(jnp.promote_types(self.dtype, jnp.float32))

    params_from_data: ClassVar[Callable[..., Any]]  # set below: the zoo's hook for data-dependent init


def patch_second_moment(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], size: int = WHITEN_KERNEL
) -> np.ndarray:
    """Returns the (k, k) second-moment matrix ``P^T P / n`` (float64, k = size * size * 3) of every
    ``size x size`` patch (stride 1, no padding) of the normalized ``images`` (uint8 (N, H, W, 3)); a
    patch is flattened in the order (row, column, channel), as an HWIO kernel's first three axes."""
    x = (np.asarray(images, np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    n, h, w, c = x.shape
    rows, cols = h - size + 1, w - size + 1
    k = size * size * c
    moment, count = np.zeros((k, k)), 0
    for start in range(0, n, 500):  # 500 images of 2x2 patches at a time: ~23 MB
        chunk = x[start : start + 500]
        taps = [chunk[:, dy : dy + rows, dx : dx + cols, :] for dy in range(size) for dx in range(size)]
        patches = np.concatenate(taps, axis=-1).reshape(-1, k)
        moment += patches.T @ patches
        count += len(patches)
    return moment / count


def whitening_kernel(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], eps: float = WHITEN_EPS
) -> np.ndarray:
    """Returns the whitening filters, float32 HWIO (2, 2, 3, 24): the eigenvectors v_i of
    ``patch_second_moment(images)``, largest eigenvalue first, scaled to v_i / sqrt(lambda_i + eps), then
    the same 12 filters negated. On ``images`` the first 12 output channels (without bias) then have the
    second-moment matrix diag(lambda_i / (lambda_i + eps)): the identity up to ``eps``."""
    eigenvalues, eigenvectors = np.linalg.eigh(patch_second_moment(images, mean, std))
    order = np.argsort(eigenvalues)[::-1]
    scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)  # (12, 12): column i is filter i
    filters = np.concatenate([scaled, -scaled], axis=1)
    return filters.reshape(WHITEN_KERNEL, WHITEN_KERNEL, 3, WHITEN_WIDTH).astype(np.float32)


def whitening_sample(images: np.ndarray, count: int = WHITEN_IMAGES) -> np.ndarray:
    """Returns ``min(count, N)`` of ``images`` (N, H, W, C), evenly spaced through the split: every
    ``N // count``-th image from the first. airbench94 takes the first 5,000 of CIFAR-10's official order, which
    is shuffled; an image-folder split is sorted by class, so its first 5,000 would all be one class."""
    step = max(1, len(images) // count)
    return np.asarray(images[::step][:count])


def params_from_data(
    params: Mapping[str, Any], images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """Returns ``params`` with the whitening filters computed from ``whitening_sample(images)`` (the training
    split, uint8 (N, 32, 32, 3), normalized with ``mean``/``std``); the bias stays as it was (0)."""
    kernel = whitening_kernel(whitening_sample(images), mean, std)
    whiten = {**params["whiten"], "kernel": jnp.asarray(kernel, params["whiten"]["kernel"].dtype)}
    return {**params, "whiten": whiten}


AirbenchNet.params_from_data = staticmethod(params_from_data)
