"""The adversarial server's model-inversion attack on a split network (He et al., 2019; Ensembler
Sec. 2.2 and 5.1), query-free: it never sends the client anything.

What the server has: its own frozen server net(s), the architecture, and auxiliary labelled
images from the training distribution. What it wants: the client's images, from the features
the client sent it. Steps:

1. Shadow network: a shadow head (three 3x3 convolutions with 64 channels, the first with
   stride 2 -> 64x16x16; the first stands for the unknown head, the other two for its noise)
   and a shadow tail, trained with cross-entropy on the auxiliary images *through the frozen
   server net(s)*, so that shadow_head(x) imitates what the real head sends.
2. Decoder: trained on auxiliary images to invert the shadow head (features -> image).
3. Apply the decoder to the features the server actually received.

Variants: ``net-i`` uses server net i alone (a tail on its 512 outputs); ``adaptive`` uses all N
nets with a learned soft selector (softmax weights over the nets) before the tail.

Restarts: many shadow heads fit the frozen nets equally well, and which one a training run lands
on decides the attack (measured: SSIM from -0.03 to 0.38 against the same undefended split across
five seeds). With ``restarts > 1`` the attacker trains several shadows and keeps, per set of
received features, the one whose decoder and head best explain them (cycle consistency: re-encode
the reconstruction with the shadow head, compare with what was received). It needs nothing beyond
what the server holds, and ranked the five seeds above almost in SSIM order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

FEATURE_DIM = 512


@dataclass(frozen=True)
class AttackSettings:
    shadow_epochs: int = 3
    decoder_epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    augment: bool = True
    device: str = "cpu"
    # > 0 adds a DeepInversion-style prior to the shadow's loss: match the batch statistics
    # entering the server nets' BatchNorm layers to the running statistics they hold (which
    # the server owns). Not in the paper's attack; 0 keeps the paper's plain shadow training.
    bn_weight: float = 0.0
    # > 0 pulls the per-position mean and standard deviation of the shadow head's features
    # towards those of the features the server received (query-free: it has them anyway).
    # Also beyond the paper's attack; 0 keeps the paper's attack.
    align_weight: float = 0.0
    # Shadows trained with seeds seed, seed+1, ...; the cycle-consistency choice picks one.
    restarts: int = 1


class ShadowHead(nn.Module):
    """3x32x32 -> 64x16x16: conv (stride 2) for the head, two convs for its unknown noise."""

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            # Linear last layer: the real features are ReLU output plus noise, so can be < 0.
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ShadowModel(nn.Module):
    """Shadow head -> frozen server net(s) -> (learned selector) -> shadow tail.

    The server nets are held in a plain list so the optimiser and ``.train()`` never see them.
    """

    def __init__(self, nets: list[nn.Module], num_classes: int = 10) -> None:
        super().__init__()
        self.head = ShadowHead()
        self.frozen = list(nets)
        for net in self.frozen:
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
        # The adaptive attacker's stand-in for the secret selector (unused with one net).
        self.gate = nn.Parameter(torch.zeros(len(nets)))
        self.tail = nn.Linear(len(nets) * FEATURE_DIM, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.head(x))

    def classify(self, z: Tensor) -> Tensor:
        """Logits from shadow-head features z."""
        outs = torch.stack([net(z) for net in self.frozen])  # N x B x 512
        if len(self.frozen) > 1:
            outs = outs * torch.softmax(self.gate, 0)[:, None, None]
        return self.tail(outs.permute(1, 0, 2).reshape(z.shape[0], -1))


class Decoder(nn.Module):
    """64x16x16 features -> 3x32x32 image in [-1, 1] (the inverse network of He et al.)."""

    def __init__(self, width: int = 64, out_channels: int = 3) -> None:
        super().__init__()
        # Small on purpose: inverting one strided convolution needs little capacity, and the
        # attack trains one decoder per variant on a CPU.
        self.net = nn.Sequential(
            nn.Conv2d(width, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, out_channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    from fedleak.data.augment import augment

    return augment(x, gen)


def _minibatches(n: int, batch_size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) >= 2:  # BatchNorm cannot train on one sample
            yield idx


class BatchNormPrior:
    """Collects, per forward pass, how far the statistics of what enters each BatchNorm layer
    of the frozen nets are from that layer's running statistics (mean over layers)."""

    def __init__(self, nets: list[nn.Module]) -> None:
        self.terms: list[Tensor] = []
        self.handles = [
            m.register_forward_hook(self._hook)
            for net in nets
            for m in net.modules()
            if isinstance(m, nn.BatchNorm2d)
        ]

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], _: Tensor) -> None:
        x = inputs[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        self.terms.append(
            torch.linalg.vector_norm(mean - module.running_mean)
            + torch.linalg.vector_norm(var - module.running_var)
        )

    def take(self) -> Tensor:
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _moments(features: Tensor) -> tuple[Tensor, Tensor]:
    return features.mean(0), features.std(0)


def train_shadow(
    nets: list[nn.Module],
    images: Tensor,
    labels: Tensor,
    settings: AttackSettings,
    name: str = "",
    received: Tensor | None = None,
) -> tuple[ShadowModel, dict]:
    """Fit shadow head, selector and tail to the auxiliary labels through the frozen nets."""
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    model = ShadowModel([net.to(device) for net in nets], int(labels.max()) + 1).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    prior = BatchNormPrior(model.frozen) if settings.bn_weight > 0 else None
    target = None
    if settings.align_weight > 0:
        if received is None:
            raise ValueError("align_weight > 0 needs the received features")
        target = [t.to(device) for t in _moments(received.float())]
    stats: dict = {}
    for epoch in range(settings.shadow_epochs):
        model.train()
        started, correct, total, loss_sum = time.monotonic(), 0, 0, 0.0
        for idx in _minibatches(len(labels), settings.batch_size, gen):
            x = _augment(images[idx], gen) if settings.augment else images[idx]
            y = labels[idx].to(device)
            z = model.head(x.to(device))
            logits = model.classify(z)
            loss = F.cross_entropy(logits, y)
            if target is not None:
                mean, std = _moments(z)
                scale = target[1].pow(2).mean()
                gap = (mean - target[0]).pow(2).mean() + (std - target[1]).pow(2).mean()
                loss = loss + settings.align_weight * gap / scale
            if prior is not None:
                loss = loss + settings.bn_weight * prior.take()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += len(idx)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(idx)
        stats = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(1, total),
            "aux_accuracy": correct / max(1, total),
            "seconds": round(time.monotonic() - started, 1),
        }
        log.info("shadow %s epoch %d: %s", name, epoch + 1, stats)
    if prior is not None:
        prior.remove()
    model.eval()
    stats["gate"] = torch.softmax(model.gate.detach(), 0).tolist()
    return model, stats


def train_decoder(
    head: nn.Module, images: Tensor, settings: AttackSettings, name: str = ""
) -> tuple[Decoder, dict]:
    """Fit a decoder to invert the frozen shadow head on the auxiliary images (MSE)."""
    head.eval()
    torch.manual_seed(settings.seed + 1)
    device = torch.device(settings.device)
    decoder = Decoder().to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    stats: dict = {}
    for epoch in range(settings.decoder_epochs):
        decoder.train()
        started, total, loss_sum = time.monotonic(), 0, 0.0
        for idx in _minibatches(len(images), settings.batch_size, gen):
            x = _augment(images[idx], gen) if settings.augment else images[idx]
            x = x.to(device)
            with torch.no_grad():
                features = head(x)
            loss = F.mse_loss(decoder(features), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += len(idx)
            loss_sum += loss.item() * len(idx)
        stats = {
            "epoch": epoch + 1,
            "mse": loss_sum / max(1, total),
            "seconds": round(time.monotonic() - started, 1),
        }
        log.info("decoder %s epoch %d: %s", name, epoch + 1, stats)
    decoder.eval()
    return decoder, stats


@torch.no_grad()
def reconstruct(decoder: nn.Module, features: Tensor, batch_size: int = 256) -> Tensor:
    """The decoder applied to received features, in batches."""
    decoder.eval()
    device = next(decoder.parameters()).device
    return torch.cat(
        [
            decoder(features[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(features), batch_size)
        ]
    )


@dataclass
class Inverter:
    """One attack variant: the shadow it trained and the decoder that inverts its head."""

    variant: str
    shadow: ShadowModel
    decoder: Decoder
    stats: dict

    def __call__(self, features: Tensor) -> Tensor:
        return reconstruct(self.decoder, features)


@torch.no_grad()
def cycle_error(
    head: nn.Module, decoder: nn.Module, received: Tensor, batch_size: int = 256
) -> float:
    """How badly decode-then-re-encode reproduces the received features (relative squared
    error): small when the shadow head behaves like the head that produced them."""
    head.eval()
    decoder.eval()
    device = next(decoder.parameters()).device
    err = ref = 0.0
    for i in range(0, len(received), batch_size):
        r = received[i : i + batch_size].to(device)
        err += float((head(decoder(r)) - r).pow(2).sum())
        ref += float(r.pow(2).sum())
    return err / max(ref, 1e-12)


def choose(inverters: list[Inverter], received: Tensor) -> tuple[Inverter, dict]:
    """The restart with the lowest cycle error on these features, and the errors compared
    (the chosen one's also serves to rank variants without ground truth)."""
    errors = [cycle_error(inv.shadow.head, inv.decoder, received) for inv in inverters]
    best = min(range(len(errors)), key=errors.__getitem__)
    return inverters[best], {
        "chosen_restart": best,
        "cycle_errors": errors,
        "cycle_error": errors[best],
    }


def variants(num_nets: int, adaptive: bool) -> list[str]:
    names = [f"net-{i}" for i in range(num_nets)]
    return names + (["adaptive"] if adaptive and num_nets > 1 else [])


def fit_inverters(
    nets: list[nn.Module],
    variant: str,
    images: Tensor,
    labels: Tensor,
    settings: AttackSettings,
    received: Tensor | None = None,
) -> list[Inverter]:
    """For one variant, ``settings.restarts`` shadow networks (seeds ``seed``, ``seed + 1``, ...)
    and the decoders that invert their heads; ``received`` only feeds the optional alignment."""
    if settings.restarts < 1:
        raise ValueError("restarts must be at least 1")
    chosen = nets if variant == "adaptive" else [nets[int(variant.removeprefix("net-"))]]
    inverters = []
    for k in range(settings.restarts):
        seeded = replace(settings, seed=settings.seed + k)
        shadow, shadow_stats = train_shadow(chosen, images, labels, seeded, variant, received)
        decoder, decoder_stats = train_decoder(shadow.head, images, seeded, variant)
        stats = {"shadow": shadow_stats, "decoder": decoder_stats, "seed": seeded.seed}
        inverters.append(Inverter(variant, shadow, decoder, stats))
    return inverters


def attack(
    nets: list[nn.Module],
    images: Tensor,
    labels: Tensor,
    received: Tensor,
    settings: AttackSettings,
    adaptive: bool = True,
) -> dict[str, tuple[Tensor, dict]]:
    """Every variant's reconstructions of ``received`` (N x 64 x 16 x 16), with its stats."""
    out = {}
    for variant in variants(len(nets), adaptive):
        inverters = fit_inverters(nets, variant, images, labels, settings, received)
        inverter, choice = choose(inverters, received)
        out[variant] = (inverter(received), {**inverter.stats, **choice})
    return out
