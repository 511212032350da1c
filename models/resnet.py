"""CIFAR-style ResNet18/34 (BasicBlock only) in Flax Linen, NHWC.

The architecture follows kuangliu/pytorch-cifar: a 3x3 stride-1 stem (no max-pool), four stages
``layer1..layer4`` of BasicBlocks at ``width x (1, 2, 4, 8)`` channels with strides 1/2/2/2, a 1x1
conv + BN projection shortcut where the shape changes, global average pooling and a Dense head.
Convolutions carry no bias and use symmetric 1-pixel padding, as PyTorch's ``padding=1`` does, so
that stride-2 stages see exactly the same windows as the PyTorch reference.

Every convolution runs ``conv_general_dilated`` (default ``jax.lax.conv_general_dilated``), a field
passed explicitly as flax's ``nn.Conv`` takes it: ``jaxcifar.backend`` hands in
``jaxcifar.models.conv.CustomGradConv`` where its gradients are faster (XLA:CPU). Parameters are the
same whatever the choice; the model itself reads no environment and no device.

Each stage output is exposed for explanation methods (GradCAM) without changing the forward pass:
``sow('intermediates', 'layerK', ...)`` records the activation when the ``intermediates``
collection is mutable, and ``perturb('layerK', ...)`` adds a zero in the ``perturbations``
collection so ``jax.grad`` with respect to it is the gradient at that activation. Both are no-ops
unless the caller asks for those collections.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")

# PyTorch BatchNorm2d(momentum=0.1) keeps 0.9 of the old running value: Flax's momentum=0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _same_padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding of a ``kernel x kernel`` conv, as PyTorch's ``padding=kernel // 2``."""
    pad = kernel // 2
    return ((pad, pad), (pad, pad))


ModuleDef = Any  # a Linen module class or a functools.partial of one


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with an identity or projection (1x1 conv + norm) shortcut.

    ``conv`` and ``norm`` are the building blocks (``ResNet`` hands in ``nn.Conv`` and ``nn.BatchNorm``
    partials with the dtype, the convolution primitive and train/eval mode bound). Input
    (B, H, W, C_in); output (B, H / strides, W / strides, features).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=_same_padding(3), name="conv1")(x)
        y = self.activation(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), padding=_same_padding(3), name="conv2")(y)
        y = self.norm(name="bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = self.conv(self.features, (1, 1), strides=self.strides, padding=0, name="shortcut_conv")(x)
            shortcut = self.norm(name="shortcut_bn")(shortcut)
        return self.activation(y + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet. ``apply(variables, x, train)`` maps (B, H, W, 3) images to (B, num_classes) logits.

    Built from its parts as kuangliu's ``ResNet(BasicBlock, [2, 2, 2, 2])`` and flax's imagenet example:
    ``block_cls`` (called as ``block_cls(features, conv=..., norm=..., strides=..., activation=...)``), ``conv`` (an
    ``nn.Conv``-like class) and ``norm`` (an ``nn.BatchNorm``-like class). Logits are float32 for float32
    and bfloat16 compute (float64 for ``dtype=float64``, e.g. to check numerics); parameters are float32
    unless given otherwise. ``conv_general_dilated`` is the convolution primitive
    (``lax.conv_general_dilated``'s signature, e.g. ``jaxcifar.models.conv.CustomGradConv()``); it changes
    the gradients' speed, not the parameters. ``activation`` is every ReLU of the network (explanation
    methods swap it, e.g. guided backpropagation); blocks get it as ``activation=``.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef = BasicBlock
    num_classes: int = 10
    width: int = 64
    dtype: Any = jnp.float32
    conv_general_dilated: Callable[..., Any] = lax.conv_general_dilated
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

    gradcam_layer: ClassVar[str] = "layer3"  # 8x8 on 32x32 inputs (layer4 is 4x4)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(
            self.conv, use_bias=False, dtype=self.dtype, conv_general_dilated=self.conv_general_dilated
        )
        norm = functools.partial(
            self.norm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype
        )
        x = jnp.asarray(x, self.dtype)
        x = conv(self.width, (3, 3), padding=_same_padding(3), name="conv1")(x)
        x = self.activation(norm(name="bn1")(x))
        for stage, (name, num_blocks) in enumerate(zip(STAGE_NAMES, self.stage_sizes, strict=True)):
            features = self.width * 2**stage
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = self.block_cls(
                    features, conv=conv, norm=norm, strides=strides, activation=self.activation, name=f"{name}_{block}"
                )(x)
            x = self.perturb(name, x)
            self.sow("intermediates", name, x)
        x = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
