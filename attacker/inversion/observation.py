"""What a gradient-inversion attacker observes, and the honest client computation producing it.

The attacker gets only what the protocol hands over (breaching's rule): the model it sent, the
update that came back, and metadata the protocol declares (batch size, local steps, learning
rate, image shape, number of classes). Ground truth never enters an ``Observation``.

Update convention (FedAvg and FedSGD alike): ``update`` is what the client sends, listed per
parameter in ``model.parameters()`` order.

- ``"fedsgd"``: the gradient of the mean cross-entropy over the batch at the sent parameters.
- ``"fedavg"``: the parameter change after local training, **new - old**. One full-batch step
  with learning rate ``lr`` gives ``-lr * gradient``, so ``-update / (lr * steps)`` approximates
  the gradient (what ``labels.py`` uses).
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

UpdateKind = Literal["fedsgd", "fedavg"]


@dataclass(frozen=True)
class Observation:
    """One client's update and the metadata the protocol declares with it.

    ``batch_size`` is the number of private images the update was computed on (what the attacker
    reconstructs). For FedAvg, ``local_batch_size`` is the mini-batch size of each local step
    (``None``: full batch); step ``t`` uses the ``t mod k``-th of the ``k`` consecutive chunks of
    the data, without shuffling. ``model_state`` is the model the server sent (parameters and
    buffers, as in ``state_dict``).
    """

    update: list[Tensor]
    kind: UpdateKind
    batch_size: int
    local_steps: int
    local_lr: float
    num_classes: int
    image_shape: tuple[int, int, int]
    model_state: dict[str, Tensor]
    local_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fedsgd", "fedavg"):
            raise ValueError(f"unknown update kind {self.kind!r} (fedsgd or fedavg)")
        if self.batch_size < 1 or self.local_steps < 1:
            raise ValueError("batch_size and local_steps must be >= 1")
        if self.kind == "fedavg" and self.local_lr <= 0:
            raise ValueError("a FedAvg observation needs the local learning rate (> 0)")

    def gradient_estimate(self) -> list[Tensor]:
        """The update as a gradient: itself for FedSGD, ``-update / (lr * steps)`` for FedAvg.

        For FedAvg this is exact only for one full-batch step; over several steps it is the mean
        gradient along the local trajectory, close to the first gradient while the steps are small.
        """
        if self.kind == "fedsgd":
            return list(self.update)
        scale = -1.0 / (self.local_lr * self.local_steps)
        return [u * scale for u in self.update]

    def to(self, device: torch.device | str) -> Observation:
        """The same observation with every tensor on ``device``."""
        return replace(
            self,
            update=[u.to(device) for u in self.update],
            model_state={k: v.to(device) for k, v in self.model_state.items()},
        )


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """The parameters an update covers, by name, in ``model.parameters()`` order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    # Cloned so a client in train mode does not move the running BN statistics of ``model``.
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _mean_ce(
    model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor
) -> Tensor:
    return F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)


def fedsgd_update(
    model: nn.Module, x: Tensor, y: Tensor, num_classes: int | None = None
) -> Observation:
    """A FedSGD client's message: the gradient of the mean cross-entropy on ``(x, y)``."""
    params = {k: v.detach().requires_grad_(True) for k, v in trainable(model).items()}
    loss = _mean_ce(model, params, _buffers(model), x, y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return Observation(
        update=[g.detach() for g in grads],
        kind="fedsgd",
        batch_size=len(x),
        local_steps=1,
        local_lr=0.0,
        num_classes=num_classes or _num_classes(model),
        image_shape=tuple(x.shape[1:]),
        model_state=_state(model),
    )


def fedavg_update(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    batch_size: int | None = None,
    num_classes: int | None = None,
) -> Observation:
    """A FedAvg client's message: ``new - old`` parameters after ``steps`` plain SGD steps.

    ``batch_size`` is the local mini-batch size (``None``: full batch); the mini-batches are the
    consecutive chunks of ``x``, cycled without shuffling. ``model`` itself is not modified.
    """
    start = _state(model)
    params = {k: v.detach().clone() for k, v in trainable(model).items()}
    buffers = _buffers(model)
    xs, ys = x.split(batch_size or len(x)), y.split(batch_size or len(x))
    for step in range(steps):
        chunk = step % len(xs)
        live = {k: v.requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(
            _mean_ce(model, live, buffers, xs[chunk], ys[chunk]), list(live.values())
        )
        params = {k: (v - lr * g).detach() for (k, v), g in zip(live.items(), grads, strict=True)}
    update = [params[k] - start[k] for k in params]
    return Observation(
        update=update,
        kind="fedavg",
        batch_size=len(x),
        local_steps=steps,
        local_lr=lr,
        num_classes=num_classes or _num_classes(model),
        image_shape=tuple(x.shape[1:]),
        model_state=start,
        local_batch_size=batch_size,
    )


def _num_classes(model: nn.Module) -> int:
    # The last parameter is the classifier's bias (K,) or, without bias, its weight (K, D).
    return int(list(trainable(model).values())[-1].shape[0])


def sent_model(model: nn.Module, observation: Observation) -> nn.Module:
    """A private copy of ``model`` holding the parameters and buffers the server sent."""
    device = next(iter(observation.model_state.values())).device
    copy = deepcopy(model).to(device)
    copy.load_state_dict(observation.model_state)
    return copy
