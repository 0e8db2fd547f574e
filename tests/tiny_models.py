"""Tiny hand-built models covering the structures the engine must handle (one parametrised table)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualCNN(nn.Module):
    """Stem + two residual blocks (one with a projection shortcut) + classifier."""

    def __init__(self, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.b2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c))
        self.short = nn.Sequential(nn.Conv2d(c, 2 * c, 1, stride=2, bias=False), nn.BatchNorm2d(2 * c))
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.short(x) + self.b2(x))
        return self.head(x.mean((2, 3)))


class DepthwiseCNN(nn.Module):
    """MobileNet-style inverted residual with a depthwise conv and a grouped conv."""

    def __init__(self, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.BatchNorm2d(4 * c), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c), nn.BatchNorm2d(4 * c), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(4 * c, c, 1), nn.BatchNorm2d(c))
        self.grouped = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, groups=2), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(self.grouped(x).mean((2, 3)))


def tiny_vit(classes: int = 10) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                             num_heads=4, num_classes=classes, pretrained=False)


CASES = {
    "residual": (ResidualCNN, (2, 3, 32, 32)),
    "depthwise": (DepthwiseCNN, (2, 3, 32, 32)),
    "vit": (tiny_vit, (2, 3, 32, 32)),
}


def make(case: str) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    return model, torch.randn(*shape)


class Bottleneck(nn.Module):
    """A residual block as torchvision writes it: relu(branch(x) + shortcut(x)), the shortcut None or a conv."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                                                           nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return torch.relu(out)


class BlockNet(nn.Module):
    """Stem + four residual blocks in two stages (three skippable: the stride-2 block has a conv shortcut)."""

    def __init__(self, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.stage1 = nn.Sequential(Bottleneck(c, c), Bottleneck(c, c))
        self.stage2 = nn.Sequential(Bottleneck(c, 2 * c, stride=2), Bottleneck(2 * c, 2 * c))
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def block_net() -> nn.Module:
    torch.manual_seed(0)
    return BlockNet().eval()
