"""A PyTorch CIFAR ResNet with the kuangliu/pytorch-cifar key layout, written for the tests.

Same architecture as ``models.resnet`` (3x3 stem without max-pool, BasicBlocks at width x (1, 2, 4, 8),
strides 1/2/2/2, 1x1 conv + BN projection shortcuts, 4x4 average pool, Linear head), same module
names as kuangliu's ``models/resnet.py`` (``conv1``, ``bn1``, ``layerK.B.{conv1,bn1,conv2,bn2}``,
``layerK.B.shortcut.{0,1}``, ``linear``), PyTorch defaults everywhere (BatchNorm momentum 0.1,
eps 1e-5, unbiased running variance). Imports torch: import it after ``require("torch")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


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
    """kuangliu's CIFAR ResNet: (B, 3, 32, 32) images -> (B, num_classes) logits."""

    def __init__(self, stage_sizes: Sequence[int], num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
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
        """(B, 3, 32, 32) -> (B, num_classes)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


def make_resnet(name: str, num_classes: int = 10, width: int = 64, seed: int = 0) -> ResNet:
    """Returns ``name`` (resnet18/resnet34) with PyTorch's default init from ``seed``, then non-trivial
    BatchNorm affine values (weight ~ U(0.5, 1.5), bias ~ N(0, 0.2)) and running statistics
    (mean ~ N(0, 0.2), var ~ U(0.5, 1.5)) and ``num_batches_tracked`` 7, as after some training."""
    torch.manual_seed(seed)
    net = ResNet(STAGES[name], num_classes=num_classes, width=width)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return net
