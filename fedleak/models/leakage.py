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
  (``torchvision_nets.INCEPTION_MIN_SIZE``), so 32x32 images must be resized before.
  ``aux_logits=False`` (one output). Its classifier has dropout 0.5: in train mode the update
  is random and no attack can reproduce the mask, so study it in eval mode. In train mode its
  last BatchNorms see 1x1 maps at 75x75, so a batch of one fails there (the "needs two inputs"
  of the slides).

Input convention: the project's images are in [-1, 1] (the data pipeline's range, and the range
every attack optimises in). A network that expects another range gets an :class:`InputTransform`
in front (``build_leakage_model(..., input=...)``): DLG's LeNet takes [0, 1] as in the paper's
code (``input="unit"``), the torchvision networks the ImageNet normalisation. The transform is
part of the model, so a client's gradient and an attacker's simulation of it see the same
function, whichever side builds it.
"""

from __future__ import annotations

import torch
from torch import nn

LEAKAGE_MODELS: tuple[str, ...] = ("lenet", "resnet18", "densenet121", "inception_v3")
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
    if name not in LEAKAGE_MODELS:
        raise ValueError(f"unknown leakage model {name!r} (known: {', '.join(LEAKAGE_MODELS)})")
    if name == "lenet":
        model: nn.Module = SigmoidLeNet(num_classes, in_channels, image_size)
    else:
        # torchvision (and the torch._dynamo it imports) costs a second or more: only the
        # studies of the larger networks pay it, never a ClientApp training dlg-lenet.
        from fedleak.models.torchvision_nets import build

        model = build(name, num_classes, in_channels, image_size)
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
