"""torchvision's ResNet-18, DenseNet-121 and Inception-v3, adapted for the leakage study (see
``fedleak.models.leakage``, which builds them by name). Kept apart because importing torchvision
costs a second or more, which a ClientApp that trains DLG's LeNet should not pay."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet, ResNet, inception
from torchvision.models.resnet import BasicBlock

INCEPTION_MIN_SIZE = 75  # Inception-v3's smallest input side (its stride-2 stem and pools)


def build(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if name == "resnet18":
        return _resnet18(num_classes, in_channels)
    if name == "densenet121":
        return _densenet121(num_classes, in_channels)
    if name == "inception_v3":
        return _inception_v3(num_classes, in_channels, image_size)
    raise ValueError(f"no torchvision network {name!r}")


class _DenseNet(DenseNet):
    """torchvision's DenseNet with its final ``F.relu`` as a module, so it can be swapped too."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.final_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.final_act(self.features(x))
        out = F.adaptive_avg_pool2d(out, (1, 1)).flatten(1)
        return self.classifier(out)


class _InceptionConv(nn.Module):
    """torchvision's ``BasicConv2d`` (conv, BN eps 1e-3) with its ``F.relu`` as a module."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _small_stem(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)


def _resnet18(num_classes: int, in_channels: int) -> nn.Module:
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    model.conv1 = _small_stem(in_channels, 64)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _densenet121(num_classes: int, in_channels: int) -> nn.Module:
    model = _DenseNet(
        growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=num_classes
    )
    model.features.conv0 = _small_stem(in_channels, 64)
    nn.init.kaiming_normal_(model.features.conv0.weight)
    model.features.pool0 = nn.Identity()
    return model


def _inception_v3(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if image_size < INCEPTION_MIN_SIZE:
        raise ValueError(
            f"inception_v3 needs inputs of at least {INCEPTION_MIN_SIZE}x"
            f"{INCEPTION_MIN_SIZE} (got {image_size}): resize the images first"
        )
    conv = _InceptionConv
    blocks = [conv] + [
        functools.partial(block, conv_block=conv)
        for block in (
            inception.InceptionA,
            inception.InceptionB,
            inception.InceptionC,
            inception.InceptionD,
            inception.InceptionE,
            inception.InceptionAux,
        )
    ]
    model = inception.Inception3(
        num_classes=num_classes,
        aux_logits=False,
        transform_input=False,
        inception_blocks=blocks,
        init_weights=True,
    )
    if in_channels != 3:
        model.Conv2d_1a_3x3 = conv(in_channels, 32, kernel_size=3, stride=2)
        # The same truncated normal torchvision's init_weights gives every other conv.
        nn.init.trunc_normal_(model.Conv2d_1a_3x3.conv.weight, std=0.1, a=-2, b=2)
    return model
