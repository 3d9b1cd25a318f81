"""Models for the gradient-leakage study: DLG's sigmoid LeNet and torchvision's larger networks.

The study (DLG slides in ``shared/papers``) attacks four architectures with ReLU replaced by
Sigmoid: L-BFGS needs second derivatives of the gradient-matching loss, and ReLU's are zero
almost everywhere. ``build_leakage_model`` returns fresh, randomly initialised networks
(``weights=None``): the attack works at any point of training, and random weights are the
setting of the study. Initialisation uses the global RNG only, so ``torch.manual_seed`` fixes it.

Small-input adaptations (CIFAR's 32x32 instead of ImageNet's 224x224):

- ResNet-18: 3x3 stride-1 stem and no max-pool (the usual CIFAR ResNet), otherwise the 32x32
  input would be 1x1 after ``layer3``.
- DenseNet-121: same stem change; with the ImageNet stem a 32x32 input leaves 1x1 maps.
- Inception-v3: kept as defined; its stem and reduction blocks need at least 75x75 inputs
  (``INCEPTION_MIN_SIZE``), so 32x32 images must be resized before. ``aux_logits=False`` (one
  output). Its classifier has dropout 0.5: in train mode the update is random and no attack can
  reproduce the mask, so study it in eval mode. In train mode its last BatchNorms see 1x1 maps at
  75x75, so a batch of one fails there (the "needs two inputs" of the slides).

Input convention: the project's images are in [-1, 1] (the data pipeline's range, and the range
every attack optimises in). A network that expects another range gets an :class:`InputTransform`
in front (``build_leakage_model(..., input=...)``): DLG's LeNet takes [0, 1] as in the paper's
code (``input="unit"``), the torchvision networks the ImageNet normalisation. The transform is
part of the model, so a client's gradient and an attacker's simulation of it see the same
function, whichever side builds it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet, ResNet, inception
from torchvision.models.resnet import BasicBlock

LEAKAGE_MODELS: tuple[str, ...] = ("lenet", "resnet18", "densenet121", "inception_v3")
INCEPTION_MIN_SIZE = 75
INPUTS: tuple[str, ...] = ("raw", "unit", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputTransform(nn.Module):
    """Maps the project's [-1, 1] images to what a network expects; no parameters.

    ``raw``: unchanged; ``unit``: [0, 1] (DLG's LeNet); ``imagenet``: [0, 1], then the
    ImageNet mean and standard deviation (their channel mean for grey images).
    """

    def __init__(self, kind: str, channels: int = 3) -> None:
        super().__init__()
        if kind not in INPUTS:
            raise ValueError(f"unknown input transform {kind!r} (known: {', '.join(INPUTS)})")
        self.kind = kind
        mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,)
        std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,)
        # Not persistent: the state dict holds only what training changes.
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "raw":
            return x
        unit = (x + 1) / 2
        return unit if self.kind == "unit" else (unit - self.mean) / self.std

    def extra_repr(self) -> str:
        return self.kind


class SigmoidLeNet(nn.Module):
    """DLG's LeNet (Zhu et al., NeurIPS'19): three 5x5 convs of 12 channels, Sigmoid, one Linear.

    Strides 2, 2, 1 with padding 2 take 32x32 to 8x8, so the Linear sees 12*8*8 = 768 features.
    ``dlg_init`` draws every weight and bias from U(-0.5, 0.5) as DLG's reference code does: the
    larger weights keep the sigmoids away from their flat tails, which is what lets DLG
    reconstruct CIFAR images with this model; PyTorch's default init makes the attack much weaker.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        dlg_init: bool = True,
    ) -> None:
        super().__init__()
        side = -(-image_size // 4)  # two stride-2 convs with padding 2: ceil(size / 4)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(12 * side * side, num_classes)
        if dlg_init:
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.uniform_(module.weight, -0.5, 0.5)
                    nn.init.uniform_(module.bias, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


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


def swap_relu_for_sigmoid(model: nn.Module) -> nn.Module:
    """Replace every ``nn.ReLU`` module by ``nn.Sigmoid``, in place (the slides' modification)."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, nn.Sigmoid())
        else:
            swap_relu_for_sigmoid(child)
    return model


def build_leakage_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    sigmoid: bool = False,
    input: str | None = None,
) -> nn.Module:
    """A freshly initialised model of the leakage study, by name (see ``LEAKAGE_MODELS``).

    ``sigmoid=True`` swaps every ReLU for a Sigmoid. ``"lenet"`` is DLG's LeNet, whose
    activations are sigmoids already, so the flag changes nothing for it. ``input`` (one of
    ``INPUTS``) puts an :class:`InputTransform` in front: ``nn.Sequential(transform, network)``,
    fed [-1, 1] images; ``None`` returns the bare network.
    """
    if input is not None and input not in INPUTS:
        raise ValueError(f"unknown input transform {input!r} (known: {', '.join(INPUTS)})")
    if name == "lenet":
        model: nn.Module = SigmoidLeNet(num_classes, in_channels, image_size)
    elif name == "resnet18":
        model = _resnet18(num_classes, in_channels)
    elif name == "densenet121":
        model = _densenet121(num_classes, in_channels)
    elif name == "inception_v3":
        model = _inception_v3(num_classes, in_channels, image_size)
    else:
        raise ValueError(f"unknown leakage model {name!r} (known: {', '.join(LEAKAGE_MODELS)})")
    model = swap_relu_for_sigmoid(model) if sigmoid else model
    if input is None:
        return model
    return nn.Sequential(InputTransform(input, in_channels), model)


def dlg_lenet(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """DLG's LeNet as the paper feeds it: [0, 1] inputs, here behind the [-1, 1] -> [0, 1] map.

    The federation's ``dlg-lenet`` and the studies build it here, so for the same weights and
    image they compute the same gradient.
    """
    return build_leakage_model("lenet", num_classes, in_channels, image_size, input="unit")
