"""Local SGD as the paper's participants run it (Torch7 SGD with learning-rate decay)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fedleak.data import ImageSet

# Returns extra (images, labels) to merge into each local batch, e.g. the attacker's fakes.
ExtraBatch = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def local_sgd(
    model: nn.Module,
    data: ImageSet,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    lr_decay: float = 0.0,
    momentum: float = 0.0,
    step_offset: int = 0,
    generator: torch.Generator | None = None,
    extra: ExtraBatch | None = None,
) -> float:
    """Run `steps` SGD updates; returns the mean loss. `step_offset` continues the decay
    schedule lr / (1 + t * decay) across turns."""
    if len(data) == 0 and extra is None:
        return float("nan")
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    order = torch.randperm(len(data), generator=generator) if len(data) else None
    cursor, total = 0, 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr / (1 + (step_offset + step) * lr_decay)
        xs, ys = [], []
        if order is not None:
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(data), generator=generator), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            xs.append(data.images[idx])
            ys.append(data.labels[idx])
        if extra is not None:
            fx, fy = extra()
            xs.append(fx)
            ys.append(fy)
        opt.zero_grad()
        loss = loss_fn(model(torch.cat(xs)), torch.cat(ys))
        loss.backward()
        opt.step()
        total += loss.item()
    return total / steps


def round_examples(
    num_examples: int, count: int, seed: int, index: int, server_round: int
) -> Tensor:
    """Indices of the ``count`` examples participant ``index`` trains on in ``server_round``.

    A pure function of its arguments, so the testbed's evaluation can recompute a victim's
    private batch for scoring without the victim ever writing it anywhere.
    """
    if count > num_examples:
        raise ValueError(f"{count} examples per round, but the partition holds {num_examples}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index * 10_007 + server_round)
    return torch.randperm(num_examples, generator=gen)[:count]


def sgd_on_examples(
    model: nn.Module, images: Tensor, labels: Tensor, *, steps: int, batch_size: int, lr: float
) -> float:
    """Plain SGD over fixed examples: step ``t`` uses the ``t mod k``-th of the ``k`` consecutive
    chunks of ``batch_size`` (no shuffle), the FedAvg client the inversion attacks model.
    One step on one chunk is a FedSGD step. Returns the mean loss."""
    model.train()
    xs, ys = images.split(batch_size), labels.split(batch_size)
    total = 0.0
    for step in range(steps):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(xs[step % len(xs)]), ys[step % len(xs)])
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
        total += loss.item()
    return total / steps
