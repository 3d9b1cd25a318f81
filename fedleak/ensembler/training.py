"""Ensembler's two training stages (Sec. 4.2) and the loop every model here is trained with.

Stage 1 (Eq. 2): N independent ``FullNet``s, each with its own fixed noise N(0, sigma) after
its head, so the N server nets differ. Stage 2 (Eq. 3): the N server nets are frozen, the
client secretly picks P of them and trains a new head and a ``Tail(N)`` through the selector,
with the penalty ``lambda * max_{i in P} cos(head(x), head_i(x))`` pushing the new head away
from every stage-1 head, so that a shadow of one server net learns the wrong head.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedleak.ensembler.data import Split, batches
from fedleak.models.ensembler import (
    FEATURE_DIM,
    ClientBundle,
    FullNet,
    Head,
    ServerBundle,
    Tail,
    gaussian_noise,
    select,
)
from fedleak.settings.ensembler import EnsemblerSettings, EnsemblerTrain

log = logging.getLogger(__name__)

FEATURE_SHAPE = (64, 16, 16)  # Head's output on a 3x32x32 CIFAR-10 image
StepLoss = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x, y) -> (loss, logits)


def seeded(seed: int, *salt: object) -> int:
    """A stable 63-bit seed per (run seed, purpose): nets and noises must not share streams."""
    text = ":".join(str(s) for s in (seed, *salt)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one (the paper preset), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode: frozen BatchNorm must not update its running statistics."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def fit(
    modules: Iterable[nn.Module],
    params: list[nn.Parameter],
    step_loss: StepLoss,
    split: Split,
    *,
    epochs: int,
    lr: float,
    tcfg: EnsemblerTrain,
    seed: int,
    augment: bool,
    name: str,
    device: torch.device | None = None,
) -> dict:
    """SGD with momentum, weight decay and a cosine schedule; returns the last epoch's stats."""
    modules = list(modules)
    opt = torch.optim.SGD(
        params, lr=lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay, nesterov=True
    )
    per_epoch = max(1, -(-len(split) // tcfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(seed)
    stats: dict = {}
    for epoch in range(epochs):
        for m in modules:
            m.train()
        started, total, correct, loss_sum = time.monotonic(), 0, 0, 0.0
        for x, y in batches(split, tcfg.batch_size, gen, with_augment=augment):
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, logits = step_loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch < sched.total_steps - 1:
                sched.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
        stats = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(1, total),
            "train_accuracy": correct / max(1, total),
            "seconds": round(time.monotonic() - started, 1),
        }
        log.info("%s epoch %d/%d: %s", name, epoch + 1, epochs, stats)
    for m in modules:
        m.eval()
    return stats


def fit_classifier(
    modules: list[nn.Module],
    forward: Callable[[Tensor], Tensor],
    split: Split,
    cfg: EnsemblerSettings,
    *,
    seed: int,
    name: str,
    device: torch.device,
) -> dict:
    """Cross-entropy training of ``forward`` end to end with the [train] settings (stage 1 and
    the one-round baselines); ``modules`` hold every trained parameter."""

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = forward(x)
        return F.cross_entropy(logits, y), logits

    t = cfg.train
    return fit(
        modules,
        [p for m in modules for p in m.parameters()],
        step,
        split,
        epochs=t.epochs,
        lr=t.lr,
        tcfg=t,
        seed=seed,
        augment=cfg.data.augment,
        name=name,
        device=device,
    )


def train_fullnet(
    split: Split,
    noise: Tensor,
    cfg: EnsemblerSettings,
    *,
    seed: int,
    name: str,
    dropout: float = 0.0,
) -> tuple[FullNet, dict]:
    """One head + fixed noise + server net + tail, trained end to end (Eq. 2)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)
    net = FullNet(noise).to(device)
    drop = nn.Dropout(dropout)

    def forward(x: Tensor) -> Tensor:
        return net.tail(drop(net.body(net.head(x) + net.noise)))

    stats = fit_classifier([net, drop], forward, split, cfg, seed=seed, name=name, device=device)
    return net.cpu().eval(), stats


def stage1(split: Split, cfg: EnsemblerSettings) -> tuple[list[FullNet], list[dict]]:
    """N distinct nets: own initialisation and own fixed noise N(0, sigma) each."""
    nets, stats = [], []
    for i in range(cfg.ensembler.num_nets):
        noise = gaussian_noise(FEATURE_SHAPE, cfg.train.sigma, seeded(cfg.seed, "noise", i))
        net, s = train_fullnet(
            split, noise, cfg, seed=seeded(cfg.seed, "stage1", i), name=f"stage1 net {i}"
        )
        nets.append(net)
        stats.append(s)
    return nets, stats


def choose_selected(num_nets: int, num_selected: int, seed: int) -> list[int]:
    """The client's secret: P of the N net indices, drawn from its own seed."""
    order = torch.randperm(num_nets, generator=torch.Generator().manual_seed(seed))
    return sorted(int(i) for i in order[:num_selected])


def cosine_penalty(features: Tensor, references: list[Tensor]) -> Tensor:
    """Eq. 3's regulariser without lambda: per image the largest cosine similarity between the
    new head's features and any selected stage-1 head's, averaged over the batch."""
    flat = features.flatten(1)
    sims = torch.stack([F.cosine_similarity(flat, r.flatten(1), dim=1) for r in references])
    return sims.max(dim=0).values.mean()


class Stage2Net(nn.Module):
    """The new head and Tail(N) around frozen server nets; only P of them are ever run.

    The frozen nets are kept in a plain list, not registered as submodules, so ``.train()``,
    ``.parameters()`` and the optimiser cannot touch them.
    """

    def __init__(self, nets: list[nn.Module], selected: list[int], noise: Tensor) -> None:
        super().__init__()
        self.head = Head()
        self.register_buffer("noise", noise.clone())
        self.tail = Tail(len(nets))
        self.frozen = [freeze(n) for n in nets]
        self.selected = list(selected)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, head features); unselected nets contribute zeros, so they are not run."""
        features = self.head(x)
        z = features + self.noise
        zeros = z.new_zeros(z.shape[0], FEATURE_DIM)
        outs = [self.frozen[i](z) if i in self.selected else zeros for i in range(len(self.frozen))]
        return self.tail(select(torch.stack(outs), self.selected)), features


def stage2(
    split: Split, nets: list[FullNet], cfg: EnsemblerSettings
) -> tuple[ServerBundle, ClientBundle, dict]:
    """Freeze the N server nets, pick P secretly, train a new head and tail with Eq. 3."""
    ens = cfg.ensembler
    selected = choose_selected(ens.num_nets, ens.selected, seeded(cfg.seed, "selector"))
    noise = gaussian_noise(FEATURE_SHAPE, cfg.train.sigma, seeded(cfg.seed, "noise", "s2"))
    device = resolve_device(cfg.device)
    torch.manual_seed(seeded(cfg.seed, "stage2"))
    bodies = [freeze(n.body).to(device) for n in nets]
    heads = [freeze(n.head).to(device) for n in nets]
    model = Stage2Net(bodies, selected, noise).to(device)
    lam = ens.lambda_
    last: dict = {}

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits, features = model(x)
        with torch.no_grad():
            refs = [heads[i](x) for i in selected]
        penalty = cosine_penalty(features, refs)
        last["cosine"] = penalty.item()
        return F.cross_entropy(logits, y) + lam * penalty, logits

    stats = fit(
        [model],
        list(model.parameters()),
        step,
        split,
        epochs=ens.stage2_epochs,
        lr=ens.lr,
        tcfg=cfg.train,
        seed=seeded(cfg.seed, "stage2-data"),
        augment=cfg.data.augment,
        name="stage2",
        device=device,
    )
    model.cpu()
    bodies = [b.cpu() for b in bodies]
    noise = model.noise.clone()
    stats["last_cosine_penalty"] = last.get("cosine")
    server = ServerBundle(bodies, FEATURE_SHAPE, "", {"defense": "ensembler"})
    client = ClientBundle(
        model.head.eval(),
        noise,
        model.tail.eval(),
        selected,
        len(nets),
        "",
        info={"defense": "ensembler"},
    )
    return server, client, stats
