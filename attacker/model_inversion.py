"""Model inversion (Fredrikson et al., CCS'15), the paper's baseline: gradient descent on the
input of the final model to maximise the target class's probability."""

from __future__ import annotations

import torch
from torch import nn


def invert(
    model: nn.Module,
    target: int,
    shape: tuple[int, int, int],
    *,
    num: int = 16,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
) -> torch.Tensor:
    """`num` reconstructions from independent starts near the blank image, in [-1, 1]."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(num, *shape, generator=gen) * 0.2 - 1.0).requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        # Fredrikson's cost 1 - p(target | x), summed over the batch of starts.
        cost = (1 - torch.softmax(model(x), dim=1)[:, target]).sum()
        cost.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    return x.detach()
