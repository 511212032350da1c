"""PyTorch twins of the fast networks (``resnet9``, ``airbench``) for ``python -m jaxcifar.bench --compare-torch``.

The same architectures as ``jaxcifar.models.resnet9`` and ``jaxcifar.models.airbench`` (see their docstrings),
in NCHW with PyTorch's default initialization: ResNet-9's conv-BN-ReLU(-pool) blocks with residuals in
layer1 and layer3, global max-pool and a bias-free head x 0.125; airbench's 2x2 whitening conv (24 filters,
bias, frozen weights) + GELU, three groups of conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU (BN
without a trainable scale, eps 1e-12, PyTorch momentum 0.4), a 3x3 max-pool and a bias-free head x 1/9.
They time the same computation; their weights are not converted from the Flax models.

torch is an optional dependency: it is imported only inside the functions below.
"""

from __future__ import annotations

import functools
from typing import Any

TWINS = ("resnet9", "airbench")


@functools.cache
def _classes() -> dict[str, type]:
    """Returns ``{name: torch.nn.Module class}`` of the twins, defined once, on first use."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    class ResNet9(nn.Module):
        """Page's ResNet-9: (B, 3, 32, 32) -> (B, num_classes)."""

        def __init__(self, num_classes: int = 10, width: int = 64) -> None:
            super().__init__()
            w = width
            self.prep = conv_bn(3, w)
            self.layer1 = nn.Sequential(conv_bn(w, 2 * w), nn.MaxPool2d(2))
            self.res1 = nn.Sequential(conv_bn(2 * w, 2 * w), conv_bn(2 * w, 2 * w))
            self.layer2 = nn.Sequential(conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))
            self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w), nn.MaxPool2d(2))
            self.res3 = nn.Sequential(conv_bn(8 * w, 8 * w), conv_bn(8 * w, 8 * w))
            self.linear = nn.Linear(8 * w, num_classes, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layer1(self.prep(x))
            x = x + self.res1(x)
            x = self.layer3(self.layer2(x))
            x = x + self.res3(x)
            return self.linear(torch.amax(x, dim=(2, 3))) * 0.125

    class Group(nn.Module):
        """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU, convs dirac-initialized."""

        def __init__(self, c_in: int, c_out: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
            self.norm1 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=0.4)
            self.norm2 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=0.4)
            for conv in (self.conv1, self.conv2):
                n = min(conv.in_channels, conv.out_channels)
                nn.init.dirac_(conv.weight.data[:n])
            for norm in (self.norm1, self.norm2):
                norm.weight.requires_grad = False  # no scale: fixed at 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
            return F.gelu(self.norm2(self.conv2(x)))

    class Airbench(nn.Module):
        """airbench94's network: (B, 3, 32, 32) -> (B, num_classes)."""

        def __init__(self, num_classes: int = 10, width: int = 64) -> None:
            super().__init__()
            self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
            self.whiten.weight.requires_grad = False
            self.group1 = Group(24, width)
            self.group2 = Group(width, 4 * width)
            self.group3 = Group(4 * width, 4 * width)
            self.linear = nn.Linear(4 * width, num_classes, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.group3(self.group2(self.group1(F.gelu(self.whiten(x)))))
            return self.linear(torch.flatten(F.max_pool2d(x, 3), 1)) / 9.0

    return {"resnet9": ResNet9, "airbench": Airbench}


def twin(name: str, num_classes: int = 10, width: int = 64) -> Any:
    """Returns the PyTorch twin (a ``torch.nn.Module``) of the fast model ``name`` (one of ``TWINS``), initialized
    from torch's global RNG. Raises ValueError for another name."""
    if name not in TWINS:
        raise ValueError(f"no PyTorch twin of {name!r}; twins: {', '.join(TWINS)}")
    return _classes()[name](num_classes=num_classes, width=width)


def trainable_parameter_count(module: Any) -> int:
    """Returns the number of parameters of a ``torch.nn.Module`` that train (``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
