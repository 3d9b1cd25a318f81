"""The agreed local training: which examples a participant holds and trains on in a round, and
the SGD it runs (Torch7 SGD with learning-rate decay, as the paper's participants).

Honest clients and attackers train with these functions; the experimenter's scoring recomputes a
victim's round batch with the same ones (a pure function of seed, participant and round), so the
victim never has to write its private batch anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor, nn

from fedleak.data import ImageSet, load_dataset
from fedleak.data.partition import by_labels, dirichlet, iid
from fedleak.protocol import Instructions
from fedleak.settings import FederationSettings, ParticipantSpec

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
    device = next(model.parameters()).device  # the batches follow the model (run.device)
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
        x = torch.cat([b.to(device) for b in xs])
        y = torch.cat([b.to(device) for b in ys])
        loss = loss_fn(model(x), y)
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
    device = next(model.parameters()).device
    xs, ys = images.to(device).split(batch_size), labels.to(device).split(batch_size)
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


@lru_cache(maxsize=4)
def _train_set(dataset: str, root: str) -> ImageSet:
    return load_dataset(dataset, "train", root or None)


def local_data(spec: ParticipantSpec, settings: FederationSettings) -> ImageSet:
    """This participant's private partition of the training set."""
    data = _train_set(settings.data.dataset, settings.data.root)
    how, seed = settings.data.partition, settings.run.seed
    if how == "labels":
        return data.subset(by_labels(data.labels.numpy(), [spec.class_list])[0])
    parts_total = settings.num_participants
    if how == "iid":
        return data.subset(iid(len(data), parts_total, seed)[spec.index])
    parts = dirichlet(data.labels.numpy(), parts_total, settings.data.alpha, seed)
    return data.subset(parts[spec.index])


def round_batch(
    spec: ParticipantSpec, settings: FederationSettings, instructions: Instructions
) -> tuple[Tensor, Tensor]:
    """The examples this participant trains on this round when the procedure fixes them (fedsgd,
    or fedavg with examples-per-round): a fixed draw from its partition."""
    data = local_data(spec, settings)
    count = instructions.examples
    if count is None:
        raise ValueError(f"a {instructions.protocol} round without examples-per-round has no batch")
    idx = round_examples(len(data), count, settings.run.seed, spec.index, instructions.server_round)
    return data.images[idx], data.labels[idx]


def train_on_instructions(
    model: nn.Module,
    spec: ParticipantSpec,
    settings: FederationSettings,
    instructions: Instructions,
    steps_done: int = 0,
) -> tuple[float, int]:
    """Run the declared training on ``model`` in place: (mean loss, examples behind the update).
    ``steps_done`` continues the learning-rate decay across a participant's turns."""
    if instructions.fixed_examples:
        images, labels = round_batch(spec, settings, instructions)
        loss = sgd_on_examples(
            model,
            images,
            labels,
            steps=instructions.steps,
            batch_size=instructions.batch_size,
            lr=instructions.lr,
        )
        return loss, len(images)
    data = local_data(spec, settings)
    gen = torch.Generator().manual_seed(
        settings.run.seed * 1000 + spec.index + 7 * instructions.server_round
    )
    loss = local_sgd(
        model,
        data,
        steps=instructions.local_batches,
        batch_size=instructions.batch_size,
        lr=instructions.lr,
        lr_decay=instructions.lr_decay,
        momentum=instructions.momentum,
        step_offset=steps_done,
        generator=gen,
    )
    return loss, len(data)


def device_for(settings: FederationSettings) -> torch.device:
    """Where this role trains and attacks: ``run.device`` (auto = the GPU when there is one)."""
    wanted = settings.run.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = cuda, but this process sees no CUDA GPU")
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")
