"""Accuracy of a classifier on labelled images (main task and per class)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then the caller's mode again (a client may be mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The model's outputs for all images, batched, on the CPU."""
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty NxCxHxW batch, got shape {tuple(images.shape)}")
    device = _device(model)
    with eval_mode(model):
        outs = [
            model(images[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(outs)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels (argmax), int64, one per image."""
    return logits(model, images, batch_size).argmax(dim=1)


def _check_labels(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
    return labels


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Fraction of images whose predicted label equals the true label."""
    labels = _check_labels(images, labels)
    return float((predict(model, images, batch_size) == labels).float().mean())


@torch.no_grad()
def class_rates(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, fake_class: int | None
) -> dict:
    """Overall and per-class accuracy, and how many images the model calls ``fake_class``.

    ``to_fake`` measures the victim-side cost of an active GAN attack: real images pushed into
    the attacker's fake class. ``per_class_accuracy`` covers the classes present in ``labels``.
    """
    labels = _check_labels(images, labels)
    pred = predict(model, images)
    correct = (pred == labels).float()
    per_class = {str(int(c)): float(correct[labels == c].mean()) for c in labels.unique()}
    to_fake = 0.0 if fake_class is None else float((pred == fake_class).float().mean())
    return {"accuracy": float(correct.mean()), "to_fake": to_fake, "per_class_accuracy": per_class}
