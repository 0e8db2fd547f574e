"""CIFAR-style ResNets (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, 6n+2 layers.

Small enough to train on a couple of CPU cores, real enough that pruning them behaves like pruning
an ImageNet ResNet (residual coupling, BatchNorm, a linear head). Default input: 1x28x28 (Fashion-MNIST).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv projection when the shape changes (option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # a real conv (not zero-padding) so torch-pruning sees an ordinary dependency
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with `depth = 6n + 2` layers; stage widths `widths` (default 16/32/64)."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110); got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, w, stride))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, H/4, W/4)
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, num_classes)


def resnet20(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)


ARCHS = {"resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56}


def build(arch: str, num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """Build a named architecture; raises SourceError naming the choices for an unknown name."""
    if arch not in ARCHS:
        from ..errors import SourceError

        raise SourceError(
            "architecture must be one of the reference CIFAR ResNets", arch, f"use one of {sorted(ARCHS)}"
        )
    return ARCHS[arch](num_classes=num_classes, in_channels=in_channels)
