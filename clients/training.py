"""Local SGD as the paper's participants run it (Torch7 SGD with learning-rate decay)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

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
