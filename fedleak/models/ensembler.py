"""Ensembler (Liu et al., 2024): a ResNet-18 split so the client keeps the first and last layers.

- ``Head``: the client's first convolution (ResNet-18's stem: conv, batch norm, ReLU). With
  ``stride=2`` and no max-pool, a 32x32 CIFAR-10 image becomes 64x16x16 features.
- ``server_net``: what one server net runs, ResNet-18 from the first residual stage to global
  pooling (512 features).
- ``select``: Eq. 1, the secret selector: concatenate the N outputs, scaled by 1/P for the P
  selected nets and 0 for the others.
- ``Tail``: the client's last fully connected layer on the selector's N x 512 vector.
- ``FullNet``: head + fixed Gaussian noise + one server net + a 512 -> classes tail, the network
  each of the N nets is trained as in stage 1 (Eq. 2).

Bundles keep the two halves apart: the server bundle holds the N server nets only; the client
bundle holds the head, its noise, the tail and the selector secret, which never leaves it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet18

from fedleak.runfolder import atomic_torch_save

FEATURE_DIM = 512
SERVER_FORMAT = "fedleak-ensembler-server/1"
CLIENT_FORMAT = "fedleak-ensembler-client/1"


class BundleError(ValueError):
    """A bundle file that is missing, damaged or inconsistent."""


class Head(nn.Module):
    """ResNet-18's stem without the max-pool: 3x32x32 -> 64x16x16."""

    def __init__(self, in_channels: int = 3, width: int = 64, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def server_net() -> nn.Sequential:
    """ResNet-18's residual stages and global average pooling: 64xHxW -> 512."""
    r = resnet18(num_classes=10)
    return nn.Sequential(r.layer1, r.layer2, r.layer3, r.layer4, r.avgpool, nn.Flatten(1))


def select(outputs: Tensor, selected: list[int] | tuple[int, ...]) -> Tensor:
    """Eq. 1: ``outputs`` is N x B x 512; returns B x (N*512) with S_i = 1/P on the selected."""
    n = outputs.shape[0]
    if not selected or any(not 0 <= i < n for i in selected) or len(set(selected)) != len(selected):
        raise ValueError(f"selected must be distinct net indices in 0..{n - 1}, got {selected}")
    weights = torch.zeros(n, dtype=outputs.dtype, device=outputs.device)
    weights[list(selected)] = 1.0 / len(selected)
    return (outputs * weights[:, None, None]).permute(1, 0, 2).reshape(outputs.shape[1], -1)


class Tail(nn.Module):
    """The client's last layer: a linear classifier on the selector's output."""

    def __init__(self, num_nets: int, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(num_nets * FEATURE_DIM, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def gaussian_noise(shape: tuple[int, ...], sigma: float, seed: int) -> Tensor:
    """The fixed noise tensor N(0, sigma) added after a head (drawn once, then kept)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * sigma


class FullNet(nn.Module):
    """One stage-1 network: head, fixed noise, server net, its own 512 -> classes tail."""

    def __init__(self, noise: Tensor, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.head = Head(in_channels)
        self.register_buffer("noise", noise.clone())
        self.body = server_net()
        self.tail = Tail(1, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(self.body(self.head(x) + self.noise))


@dataclass
class ServerBundle:
    """What the server may know: the N frozen server nets and the feature shape they expect."""

    nets: list[nn.Module]
    input_shape: tuple[int, int, int]
    version: str
    info: dict = field(default_factory=dict)


@dataclass
class ClientBundle:
    """What only the client knows: head, noise, tail and the selector secret."""

    head: Head
    noise: Tensor
    tail: Tail
    selected: list[int]
    num_nets: int
    server_version: str
    image_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    info: dict = field(default_factory=dict)

    def encode(self, images: Tensor) -> Tensor:
        """What the client sends: head(x) + its fixed noise."""
        return self.head(images) + self.noise

    def decode(self, outputs: Tensor) -> Tensor:
        """Logits from the server's N x B x 512 answer."""
        return self.tail(select(outputs, self.selected))


def _load(path: str | os.PathLike, expected: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BundleError(f"cannot read bundle {path}: {err}") from err
    if not isinstance(obj, dict) or obj.get("format") != expected:
        raise BundleError(f"{path} is not a {expected} bundle")
    return obj


def save_server_bundle(bundle: ServerBundle, path: str | os.PathLike) -> Path:
    return atomic_torch_save(
        {
            "format": SERVER_FORMAT,
            "version": bundle.version,
            "input_shape": list(bundle.input_shape),
            "info": bundle.info,
            "nets": [net.state_dict() for net in bundle.nets],
        },
        path,
    )


def load_server_bundle(path: str | os.PathLike) -> ServerBundle:
    obj = _load(path, SERVER_FORMAT)
    nets = []
    for i, state in enumerate(obj["nets"]):
        net = server_net()
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise BundleError(f"{path}: server net {i} does not fit ResNet-18: {err}") from err
        nets.append(net.eval())
    if not nets:
        raise BundleError(f"{path}: the bundle holds no server nets")
    return ServerBundle(nets, tuple(obj["input_shape"]), str(obj["version"]), obj.get("info", {}))


def save_client_bundle(bundle: ClientBundle, path: str | os.PathLike) -> Path:
    return atomic_torch_save(
        {
            "format": CLIENT_FORMAT,
            "head": bundle.head.state_dict(),
            "noise": bundle.noise,
            "tail": bundle.tail.state_dict(),
            "selected": list(bundle.selected),
            "num_nets": bundle.num_nets,
            "server_version": bundle.server_version,
            "image_shape": list(bundle.image_shape),
            "num_classes": bundle.num_classes,
            "info": bundle.info,
        },
        path,
    )


def load_client_bundle(path: str | os.PathLike) -> ClientBundle:
    obj = _load(path, CLIENT_FORMAT)
    image_shape = tuple(obj["image_shape"])
    head = Head(image_shape[0])
    tail = Tail(int(obj["num_nets"]), int(obj["num_classes"]))
    try:
        head.load_state_dict(obj["head"])
        tail.load_state_dict(obj["tail"])
    except RuntimeError as err:
        raise BundleError(f"{path}: head or tail does not fit: {err}") from err
    bundle = ClientBundle(
        head.eval(),
        obj["noise"],
        tail.eval(),
        [int(i) for i in obj["selected"]],
        int(obj["num_nets"]),
        str(obj["server_version"]),
        image_shape,
        int(obj["num_classes"]),
        obj.get("info", {}),
    )
    select(torch.zeros(bundle.num_nets, 1, FEATURE_DIM), bundle.selected)  # validates the secret
    return bundle
