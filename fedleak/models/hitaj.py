"""The architectures of Hitaj et al. (CCS'17), Appendix A, as plain torch modules.

The shared models end in logits; the paper's LogSoftMax + NLL is ``nn.CrossEntropyLoss`` here.
Figure 17 is garbled in the paper's text; the layer sizes below are the only ones that give its
512-wide flatten from a 64x64 input (64 -> conv5 60 -> pool3 20 -> conv5 16 -> pool2 8 -> conv5 4
-> pool2 2; 128 * 2 * 2 = 512).
"""

from __future__ import annotations

import torch
from torch import nn

NOISE_DIM = 100


class MnistCNN(nn.Module):
    """Figure 15: the collaboratively trained MNIST model, 10 digits + 1 fake class."""

    def __init__(self, num_classes: int = 11) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5),
            nn.Tanh(),
            nn.MaxPool2d(3, 3),
            nn.Conv2d(32, 64, 5),
            nn.Tanh(),
            nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256, 200),
            nn.Tanh(),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FacesCNN(nn.Module):
    """Figure 17: the AT&T faces model, 40 people + 1 fake class."""

    def __init__(self, num_classes: int = 41) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5),
            nn.Tanh(),
            nn.MaxPool2d(3, 3),
            nn.Conv2d(32, 64, 5),
            nn.Tanh(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 5),
            nn.Tanh(),
            nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512, 400),
            nn.Tanh(),
            nn.Linear(400, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _up(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class DCGANGenerator(nn.Module):
    """Figures 16 and 18: DCGAN generator from 100-d uniform noise to an image in [-1, 1].

    ``widths`` lists the channels after the first (4x4) layer; each further layer doubles the size.
    """

    def __init__(self, widths: tuple[int, ...], out_channels: int = 1, nz: int = NOISE_DIM) -> None:
        super().__init__()
        self.nz = nz
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for cin, cout in zip(widths, widths[1:], strict=False):
            layers += _up(cin, cout)
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_generator_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.nz, 1, 1))


def mnist_generator() -> DCGANGenerator:
    """Figure 16: 4 transposed convolutions, 100 -> 256 -> 128 -> 64 -> 1, output 32x32."""
    return DCGANGenerator((256, 128, 64))


def faces_generator() -> DCGANGenerator:
    """Figure 18: 5 transposed convolutions, 100 -> 512 -> 256 -> 128 -> 64 -> 1, output 64x64."""
    return DCGANGenerator((512, 256, 128, 64))


def init_generator_weights(module: nn.Module) -> None:
    """N(0, 0.02) as in DCGAN, applied to G only: D is the shared model and keeps its own init."""
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose2d | nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def sample_noise(
    n: int, nz: int = NOISE_DIM, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The paper's 100-d uniform input, on [-1, 1]."""
    return torch.rand(n, nz, generator=generator) * 2 - 1
