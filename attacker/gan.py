"""The GAN attack of Hitaj et al. (CCS'17), Algorithm 1, as the attacker's training step.

On each turn the attacker takes the downloaded model as discriminator D, trains its generator G
so that D labels G's images as the victim's class a, then (active variant) labels G's images as
the fake class c and trains on them together with its own data, which pushes the victim to reveal
more about a. The passive variant trains G the same way but injects nothing. The attacker sees
only what the protocol gives it: the shared parameters and its own data.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from flwr.app import Context, Message
from torch import nn

from fedleak.attacker.generator_store import GeneratorStore
from fedleak.clients.app import model_from, reply
from fedleak.clients.participant import Participant, local_data
from fedleak.clients.training import local_sgd
from fedleak.models import build_generator
from fedleak.models.hitaj import sample_noise


def train_generator(
    generator: nn.Module,
    discriminator: nn.Module,
    target: int,
    *,
    steps: int,
    batch: int,
    lr: float,
    rng: torch.Generator | None = None,
) -> float:
    """Algorithm 1 lines 6-8: update G so that the frozen replica D predicts `target`."""
    for p in discriminator.parameters():
        p.requires_grad_(False)
    discriminator.eval()
    generator.train()
    opt = torch.optim.SGD(generator.parameters(), lr=lr)
    labels = torch.full((batch,), target, dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss()
    total = 0.0
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(discriminator(generator(sample_noise(batch, generator=rng))), labels)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(1, steps)


def fake_batches(generator: nn.Module, count: int, fake_class: int, rng: torch.Generator):
    """Lines 9-11: G's samples of class a, labelled as the fake class c."""

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            images = generator(sample_noise(count, generator=rng))
        return images, torch.full((count,), fake_class, dtype=torch.long)

    return make


def save_samples(
    generator: nn.Module, out_dir: Path, server_round: int, num: int, seed: int, meta: dict
) -> Path:
    """Images from a fixed noise batch, so rounds are comparable; written atomically."""
    fixed = sample_noise(num, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        images = generator(fixed).clamp(-1, 1)
    path = out_dir / "samples" / f"round-{server_round:04d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"round": server_round, "images": images, **meta}, tmp)
    os.replace(tmp, path)
    return path


def attacker_train(msg: Message, context: Context, me: Participant) -> Message:
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])
    seed = int(context.run_config["run.seed"])
    rng = torch.Generator().manual_seed(seed * 1000 + 17 * server_round + me.index)
    model = model_from(msg, context)
    generator = build_generator(str(context.run_config["model.name"]))
    state_dir = me.settings.get("state-dir")
    store = GeneratorStore(context, state_dir)
    turns = store.load(generator)

    target, fake = int(me.settings["target-class"]), int(me.settings["fake-class"])
    discriminator = copy.deepcopy(model)
    train_generator(
        generator,
        discriminator,
        target,
        steps=int(me.attack("gen-steps")),
        batch=int(me.attack("gen-batch")),
        lr=float(me.attack("gen-lr")),
        rng=rng,
    )

    active = me.settings.get("mode", "active") == "active"
    extra = (
        fake_batches(generator, int(me.attack("fakes-per-batch")), fake, rng) if active else None
    )
    data = local_data(me, context.run_config)
    steps = int(config["local-batches"])
    loss = local_sgd(
        model,
        data,
        steps=steps,
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        lr_decay=float(config["lr-decay"]),
        momentum=float(config["momentum"]),
        step_offset=turns * steps,
        generator=rng,
        extra=extra,
    )
    if len(data) == 0 and not active:
        loss = 0.0  # a passive attacker without data uploads nothing new; report like others

    turns += 1
    store.save(generator, turns)
    every = max(1, int(me.attack("sample-every")))
    if turns == 1 or turns % every == 0:
        out_dir = Path(me.settings.get("out-dir") or state_dir or "attacker-out")
        save_samples(
            generator,
            out_dir,
            server_round,
            int(me.attack("num-samples")),
            seed,
            {"target": target, "fake": fake, "mode": me.settings.get("mode", "active")},
        )
    return reply(msg, model, loss, len(data))
