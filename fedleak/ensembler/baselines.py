"""Every defense of Table 1 as a trained client/server split (a server and a client bundle).

- ``none``: plain ResNet-18 split, no noise.
- ``shredder``: Shredder-style, the NONE model with a small fixed noise added to the head's
  output at inference, no retraining (Shredder learns its noise distribution; here it is one
  fixed Gaussian tensor). Its server nets are NONE's, byte for byte.
- ``single``: one net retrained with a large fixed noise after its head.
- ``dr-single`` / ``dr-ensemble``: one net, or one head on N nets, with the usual small noise and
  a dropout layer where Ensembler has its selector (on the server nets' joint output, before the
  tail), trained end to end in one round (no stage 2, no secret selection).
- ``ensembler``: stage 1 + stage 2 (``training``).

Trained bundles are cached by a hash of exactly the settings they depend on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fedleak.ensembler import training
from fedleak.ensembler.data import Split
from fedleak.models.ensembler import (
    ClientBundle,
    FullNet,
    Head,
    ServerBundle,
    Tail,
    gaussian_noise,
    load_client_bundle,
    load_server_bundle,
    save_client_bundle,
    save_server_bundle,
    select,
    server_net,
)
from fedleak.settings.ensembler import EnsemblerSettings

log = logging.getLogger(__name__)

CODE_VERSION = 1  # bump when training changes, so stale cached bundles are not reused
LABELS = {
    "none": "NONE",
    "shredder": "Shredder",
    "single": "Single",
    "dr-single": "DR-single",
    "dr-ensemble": "DR-ensemble",
    "ensembler": "Ensembler",
}


@dataclass(frozen=True)
class Trained:
    """Where one defense's two bundles are, and what training reported."""

    defense: str
    server_path: Path
    client_path: Path
    stats: dict


def settings(defense: str, cfg: EnsemblerSettings) -> dict:
    """Exactly the settings a defense's bundles depend on (its cache key)."""
    data = {k: cfg.data.to_toml_dict()[k] for k in ("dataset", "client-train", "augment")}
    base = {"code": CODE_VERSION, "seed": cfg.seed, "data": data, "train": cfg.train.to_toml_dict()}
    b = cfg.baselines
    extra = {
        "none": {},
        "shredder": {"shredder-sigma": b.shredder_sigma},
        "single": {"single-sigma": b.single_sigma},
        "dr-single": {"dropout": b.dropout},
        "dr-ensemble": {"dropout": b.dropout, "num-nets": cfg.ensembler.num_nets},
        "ensembler": {"ensembler": cfg.ensembler.to_toml_dict()},
    }[defense]
    return {"defense": defense, **base, **extra}


def cache_key(defense: str, cfg: EnsemblerSettings) -> str:
    text = json.dumps(settings(defense, cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _zero_noise() -> Tensor:
    return torch.zeros(training.FEATURE_SHAPE)


def _split(net: FullNet, defense: str) -> tuple[ServerBundle, ClientBundle]:
    server = ServerBundle(
        [training.freeze(net.body)], training.FEATURE_SHAPE, "", {"defense": defense}
    )
    client = ClientBundle(
        net.head.eval(), net.noise.clone(), net.tail.eval(), [0], 1, "", info={"defense": defense}
    )
    return server, client


class DropoutEnsemble(nn.Module):
    """DR-*: one head and noise, N server nets, dropout on the selector's output, one tail."""

    def __init__(self, noise: Tensor, num_nets: int, dropout: float) -> None:
        super().__init__()
        self.head = Head()
        self.register_buffer("noise", noise.clone())
        self.bodies = nn.ModuleList(server_net() for _ in range(num_nets))
        self.drop = nn.Dropout(dropout)
        self.tail = Tail(num_nets)

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(x) + self.noise
        outs = torch.stack([b(z) for b in self.bodies])
        # All N nets "selected" (weights 1/N), the same vector the client computes at inference.
        return self.tail(self.drop(select(outs, list(range(len(self.bodies))))))


def _train_dropout(split: Split, cfg: EnsemblerSettings, num_nets: int, defense: str):
    seed = training.seeded(cfg.seed, defense)
    noise = gaussian_noise(
        training.FEATURE_SHAPE,
        cfg.train.sigma,
        training.seeded(cfg.seed, "noise", defense),
    )
    device = training.resolve_device(cfg.device)
    torch.manual_seed(seed)
    model = DropoutEnsemble(noise, num_nets, cfg.baselines.dropout).to(device)

    stats = training.fit_classifier(
        [model], model, split, cfg, seed=seed, name=defense, device=device
    )
    model.cpu()
    server = ServerBundle(
        [training.freeze(b) for b in model.bodies], training.FEATURE_SHAPE, "", {"defense": defense}
    )
    selected = list(range(num_nets))
    client = ClientBundle(
        model.head.eval(),
        noise,
        model.tail.eval(),
        selected,
        num_nets,
        "",
        info={"defense": defense},
    )
    return server, client, stats


def stage1_cached(
    split: Split, cfg: EnsemblerSettings, cache_root: Path | None
) -> tuple[list[FullNet], list]:
    """Stage 1, reused across stage-2 settings: it depends on neither P, lambda nor stage 2."""
    key_cfg = {**settings("none", cfg), "num-nets": cfg.ensembler.num_nets}
    key = hashlib.sha256(json.dumps(key_cfg, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root / f"stage1-{key}.pt" if cache_root is not None and cfg.cache else None
    if path is not None and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        nets = []
        for state in blob["nets"]:
            net = FullNet(state["noise"])
            net.load_state_dict(state)
            nets.append(net.eval())
        return nets, blob["stats"]
    nets, stats = training.stage1(split, cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"nets": [n.state_dict() for n in nets], "stats": stats}, path)
    return nets, stats


def train_defense(
    defense: str,
    split: Split,
    cfg: EnsemblerSettings,
    none: tuple | None = None,
    cache_root: Path | None = None,
):
    """(server bundle, client bundle, stats) for one defense; ``none`` feeds Shredder;
    ``cache_root`` lets Ensembler reuse a cached stage 1."""
    seed = cfg.seed
    b = cfg.baselines
    if defense == "none":
        net, stats = training.train_fullnet(
            split, _zero_noise(), cfg, seed=training.seeded(seed, "none"), name="none"
        )
        return (*_split(net, defense), stats)
    if defense == "shredder":
        if none is None:
            raise ValueError("shredder needs the trained NONE bundles")
        server, client = none
        noise = gaussian_noise(
            training.FEATURE_SHAPE, b.shredder_sigma, training.seeded(seed, "noise", "shredder")
        )
        shredded = ClientBundle(
            client.head, noise, client.tail, [0], 1, "", info={"defense": defense}
        )
        return server, shredded, {"retrained": False}
    if defense == "single":
        noise = gaussian_noise(
            training.FEATURE_SHAPE, b.single_sigma, training.seeded(seed, "noise", "single")
        )
        net, stats = training.train_fullnet(
            split, noise, cfg, seed=training.seeded(seed, "single"), name="single"
        )
        return (*_split(net, defense), stats)
    if defense == "dr-single":
        return _train_dropout(split, cfg, 1, defense)
    if defense == "dr-ensemble":
        return _train_dropout(split, cfg, cfg.ensembler.num_nets, defense)
    if defense == "ensembler":
        nets, stage1_stats = stage1_cached(split, cfg, cache_root)
        server, client, stats = training.stage2(split, nets, cfg)
        return server, client, {"stage1": stage1_stats, "stage2": stats}
    raise ValueError(f"unknown defense {defense!r}")


def write_pair(server: ServerBundle, client: ClientBundle, folder: Path, version: str) -> None:
    """Two separate files: the server's holds no head, tail or selection."""
    server.version = client.server_version = version
    save_server_bundle(server, folder / "server.pt")
    save_client_bundle(client, folder / "client.pt")


def build(
    defenses: list[str], split: Split, cfg: EnsemblerSettings, cache_root: Path
) -> dict[str, Trained]:
    """Train (or reuse from ``cache_root``) each defense's bundles, NONE first."""
    out: dict[str, Trained] = {}
    ordered = sorted(defenses, key=lambda d: list(LABELS).index(d))
    for defense in ordered:
        key = cache_key(defense, cfg)
        folder = cache_root / f"{defense}-{key}"
        stats_file = folder / "stats.json"
        if not (cfg.cache and stats_file.is_file() and (folder / "client.pt").is_file()):
            none = None
            if defense == "shredder":
                none_dir = out["none"].server_path.parent if "none" in out else None
                none = (
                    load_server_bundle(none_dir / "server.pt"),
                    load_client_bundle(none_dir / "client.pt"),
                )
            log.info("training %s (cache %s)", defense, folder)
            server, client, stats = train_defense(defense, split, cfg, none, cache_root)
            # Shredder runs on NONE's server: the same version string, the same nets.
            version = out["none"].stats["version"] if defense == "shredder" else key
            folder.mkdir(parents=True, exist_ok=True)
            write_pair(server, client, folder, version)
            stats = {"version": version, "settings": settings(defense, cfg), "training": stats}
            stats_file.write_text(json.dumps(stats, indent=2, default=str), "utf-8")
        stats = json.loads(stats_file.read_text("utf-8"))
        server_path = folder / "server.pt"
        if defense == "shredder":
            server_path = out["none"].server_path  # never a second copy of NONE's nets
            (folder / "server.pt").unlink(missing_ok=True)
        out[defense] = Trained(defense, server_path, folder / "client.pt", stats)
    return out
