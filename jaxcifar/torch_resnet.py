"""kuangliu/pytorch-cifar's ResNet in PyTorch: the one reference for ``--compare-torch`` and the torch tests.

The architecture of kuangliu's ``models/resnet.py`` with BasicBlocks, as ``jaxcifar.models.resnet``: a
3x3 stride-1 stem without max-pool (``conv1``, ``bn1``), ``layer1..layer4`` of BasicBlocks
(``conv1``, ``bn1``, ``conv2``, ``bn2``, ``shortcut.0``/``shortcut.1`` = 1x1 conv + BN where the shape
changes) at ``width x (1, 2, 4, 8)`` channels with strides 1/2/2/2, global average pooling and a
``linear`` head, PyTorch defaults everywhere (BatchNorm momentum 0.1, eps 1e-5). The state_dict keys are
kuangliu's, the ones ``jaxcifar.interop`` converts. One deliberate difference: kuangliu pools with
``F.avg_pool2d(out, 4)``, which is global pooling only for 32x32 inputs; this module pools globally
(``adaptive_avg_pool2d(out, 1)``), as the Flax model does at every input size.

torch is an optional dependency (``pip install 'jaxcifar[torch]'``): it is imported only inside the
functions below, never when this module is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from jaxcifar import models


@functools.cache
def _classes() -> tuple[type, type]:
    """Returns the (BasicBlock, ResNet) torch.nn.Module classes, defined once, on first use."""
    import torch  # optional dependency: only here
    import torch.nn.functional as F
    from torch import nn

    class BasicBlock(nn.Module):
        """conv-BN-ReLU, conv-BN, plus the identity or a 1x1 conv + BN projection, then ReLU."""

        def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """(B, C_in, H, W) -> (B, planes, H / stride, W / stride)."""
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))

    class ResNet(nn.Module):
        """kuangliu's CIFAR ResNet: (B, 3, H, W) images -> (B, num_classes) logits."""

        def __init__(self, stage_sizes: Sequence[int], num_classes: int = 10, width: int = 64) -> None:
            super().__init__()
            if len(stage_sizes) != 4:
                raise ValueError(f"kuangliu's ResNet has 4 stages (layer1..layer4), got stage_sizes {stage_sizes}")
            self.in_planes = width
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = self._make_layer(width, stage_sizes[0], 1)
            self.layer2 = self._make_layer(2 * width, stage_sizes[1], 2)
            self.layer3 = self._make_layer(4 * width, stage_sizes[2], 2)
            self.layer4 = self._make_layer(8 * width, stage_sizes[3], 2)
            self.linear = nn.Linear(8 * width, num_classes)

        def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
            layers = []
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(BasicBlock(self.in_planes, planes, s))
                self.in_planes = planes
            return nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """(B, 3, H, W) -> (B, num_classes)."""
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            out = F.adaptive_avg_pool2d(out, 1)  # global: kuangliu's avg_pool2d(out, 4) at 32x32
            return self.linear(torch.flatten(out, 1))

    return BasicBlock, ResNet


def resnet(name: str = "resnet18", num_classes: int = 10, width: int = 64) -> Any:
    """Returns kuangliu's ResNet (a ``torch.nn.Module``) with the stages of ``jaxcifar.models.get_model(name)``,
    PyTorch's default initialization drawn from torch's global RNG. Raises ValueError for an unknown ``name``."""
    stage_sizes = models.get_model(name).stage_sizes
    return _classes()[1](stage_sizes, num_classes=num_classes, width=width)


def make_resnet(name: str = "resnet18", num_classes: int = 10, width: int = 64, seed: int = 0) -> Any:
    """Returns ``resnet(name, num_classes, width)`` initialized from ``seed``, with non-trivial BatchNorm state
    as after some training: weight ~ U(0.5, 1.5), bias ~ N(0, 0.2), running mean ~ N(0, 0.2), running var
    ~ U(0.5, 1.5), ``num_batches_tracked`` 7 (the reference of the equivalence tests)."""
    import torch  # optional dependency: only here

    torch.manual_seed(seed)
    net = resnet(name, num_classes=num_classes, width=width)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return net
