"""Small reference architectures with trained baselines (see prunepilot.models.baseline)."""

from .cifar_resnet import ARCHS, BasicBlock, CifarResNet, build, resnet20, resnet32, resnet56

__all__ = ["ARCHS", "BasicBlock", "CifarResNet", "build", "resnet20", "resnet32", "resnet56"]
