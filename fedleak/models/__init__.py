"""Model registry: the shared classifier and the attacker's generator for each dataset."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedleak.errors import ConfigError
from fedleak.models.hitaj import FacesCNN, MnistCNN, faces_generator, mnist_generator
from fedleak.models.leakage import dlg_lenet


def _dlg_lenet(num_classes: int) -> nn.Module:
    # DLG's LeNet takes [0, 1] images as in the paper; the data pipeline gives [-1, 1].
    return dlg_lenet(num_classes, in_channels=3, image_size=32)


def _no_generator() -> nn.Module:
    raise ConfigError("this model has no generator; the GAN attack needs hitaj-mnist/hitaj-faces")


# name -> (classifier factory taking num_classes, generator factory, dataset it expects)
MODELS: dict[str, tuple[Callable[[int], nn.Module], Callable[[], nn.Module], str]] = {
    "hitaj-mnist": (MnistCNN, mnist_generator, "mnist"),
    "hitaj-faces": (FacesCNN, faces_generator, "faces"),
    "dlg-lenet": (_dlg_lenet, _no_generator, "cifar10"),
}


def _entry(name: str) -> tuple[Callable[[int], nn.Module], Callable[[], nn.Module], str]:
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]


def build_classifier(name: str, num_classes: int) -> nn.Module:
    return _entry(name)[0](num_classes)


def build_generator(name: str) -> nn.Module:
    return _entry(name)[1]()


def model_dataset(name: str) -> str:
    return _entry(name)[2]
