"""David Page's ResNet-9 ("How to train your ResNet", davidcpage/cifar10-fast ``dawn_utils.net``), NHWC.

prep: conv-BN-ReLU at ``width`` (64) channels, 32x32;
layer1: conv-BN-ReLU at 2 x width, 2x2 max-pool (16x16), plus a residual of two conv-BN-ReLU;
layer2: conv-BN-ReLU at 4 x width, max-pool (8x8);
layer3: conv-BN-ReLU at 8 x width, max-pool (4x4), plus a residual of two conv-BN-ReLU;
then a global max-pool, a Dense layer without bias and the logits multiplied by 0.125.
Every convolution is 3x3, stride 1, padding 1, without bias; BatchNorm as PyTorch's default
(momentum 0.1, eps 1e-5). At width 64 it has 6,573,120 parameters, as the original.

Weights start as PyTorch's defaults (uniform in +-1/sqrt(fan_in) for convolutions and the Dense layer),
so that the learning rates of the original recipe carry over. Modules: ``prep``, ``layerK_conv``,
``layerK_res1``, ``layerK_res2``. Stage outputs (after the residual) are sown and perturbed as
``layer1``..``layer3`` (16x16, 8x8, 4x4 on 32x32 inputs) for Grad-CAM; ``layer2`` is its layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from jaxcifar.models.conv import global_max_pool, max_pool

# PyTorch's default init of Conv2d and Linear weights (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# PyTorch BatchNorm2d(momentum=0.1): Flax keeps 0.9 of the old running value.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
LOGIT_SCALE = 0.125


class ConvBN(nn.Module):
    """3x3 conv (no bias) -> BatchNorm -> ReLU, then a 2x2 max-pool when ``pool``.

    (B, H, W, C) -> (B, H', W', features)."""

    features: int
    pool: bool = False
    dtype: Any = jnp.float32
    conv_general_dilated: Callable[..., Any] = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = nn.Conv(
            self.features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=TORCH_DEFAULT_INIT,
            dtype=self.dtype,
            conv_general_dilated=self.conv_general_dilated,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype, name="bn"
        )(x)
        x = nn.relu(x)
        if self.pool:
            x = max_pool(x, 2)
        return x


class ResNet9(nn.Module):
    """Page's ResNet-9. ``apply(variables, x, train)`` maps (B, 32, 32, 3) images to (B, num_classes)
    logits (float32 for float32/bfloat16/float16 compute). ``width`` is the prep layer's channel count."""

    num_classes: int = 10
    width: int = 64
    dtype: Any = jnp.float32
    conv_general_dilated: Callable[..., Any] = lax.conv_general_dilated

    gradcam_layer: ClassVar[str] = "layer2"  # 8x8 on 32x32 inputs (layer3 is 4x4)
    cpu_auto_conv: ClassVar[str] = "lax"  # --conv-impl auto on one CPU (models.cpu_auto_conv): measured faster

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        block = functools.partial(ConvBN, dtype=self.dtype, conv_general_dilated=self.conv_general_dilated)
        x = jnp.asarray(x, self.dtype)
        x = block(self.width, name="prep")(x, train)
        for stage, (name, residual) in enumerate((("layer1", True), ("layer2", False), ("layer3", True))):
            features = self.width * 2 ** (stage + 1)
            x = block(features, pool=True, name=f"{name}_conv")(x, train)
            if residual:
                x = x + block(features, name=f"{name}_res2")(block(features, name=f"{name}_res1")(x, train), train)
            x = self.perturb(name, x)
            self.sow("intermediates", name, x)
        x = global_max_pool(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
        x = nn.Dense(self.num_classes, use_bias=False, kernel_init=TORCH_DEFAULT_INIT, dtype=self.dtype, name="linear")(
            x
        )
        return (x * LOGIT_SCALE).astype(jnp.promote_types(self.dtype, jnp.float32))
