"""The GAN attack of Hitaj et al. (CCS'17), Algorithm 1, as the attacker's training step.

On each turn the attacker takes the downloaded model as discriminator D, trains its generator G
so that D labels G's images as the victim's class a, then (active variant) labels G's images as
the fake class c and trains on them together with its own data, which pushes the victim to reveal
more about a. The passive variant trains G the same way but injects nothing. The attacker sees
only what the protocol gives it: the shared parameters and its own data.
"""

from __future__ import annotations

import copy

import torch
from flwr.app import Context, Message
from torch import nn

from fedleak.attacker.generator_store import GeneratorStore
from fedleak.messages import instructions, received_model, train_reply
from fedleak.models import build_generator
from fedleak.models.hitaj import sample_noise
from fedleak.records import SampleSet
from fedleak.reporting import participant_reporter
from fedleak.settings import FederationSettings
from fedleak.settings.flower import NodeIdentity
from fedleak.training import device_for, local_data, local_sgd


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
    device = next(generator.parameters()).device  # noise is drawn on the CPU: seeded the same
    labels = torch.full((batch,), target, dtype=torch.long, device=device)
    loss_fn = nn.CrossEntropyLoss()
    total = 0.0
    for _ in range(steps):
        opt.zero_grad()
        noise = sample_noise(batch, generator=rng).to(device)
        loss = loss_fn(discriminator(generator(noise)), labels)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(1, steps)


def fake_batches(generator: nn.Module, count: int, fake_class: int, rng: torch.Generator):
    """Lines 9-11: G's samples of class a, labelled as the fake class c."""

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            device = next(generator.parameters()).device
            images = generator(sample_noise(count, generator=rng).to(device))
        return images, torch.full((count,), fake_class, dtype=torch.long)

    return make


def fixed_samples(generator: nn.Module, num: int, seed: int) -> torch.Tensor:
    """Images from a fixed noise batch, so rounds are comparable, in [-1, 1] on the CPU."""
    device = next(generator.parameters()).device
    fixed = sample_noise(num, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        return generator(fixed).clamp(-1, 1).cpu()


def train(
    msg: Message, context: Context, identity: NodeIdentity, settings: FederationSettings
) -> Message:
    """The attacker's turn: Algorithm 1 on the received model, then the agreed local training
    (with the fakes mixed in for the active variant), then a reply like everyone else's."""
    spec, attack = identity.spec, identity.attack
    todo = instructions(msg)
    seed = settings.run.seed
    device = device_for(settings)
    rng = torch.Generator().manual_seed(seed * 1000 + 17 * todo.server_round + spec.index)
    model = received_model(msg, settings).to(device)
    generator = build_generator(settings.model.name).to(device)
    store = GeneratorStore(context, spec.state_dir or None)
    turns = store.load(generator)

    if spec.target_class is None:
        raise ValueError(f"{spec.label} has no target-class: a GAN attacker needs one")
    target = spec.target_class
    fake = spec.fake_class if spec.fake_class is not None else settings.model.num_classes - 1
    train_generator(
        generator,
        copy.deepcopy(model),
        target,
        steps=attack.gen_steps,
        batch=attack.gen_batch,
        lr=attack.gen_lr,
        rng=rng,
    )
    active = spec.mode == "active"
    extra = fake_batches(generator, attack.fakes_per_batch, fake, rng) if active else None
    data = local_data(spec, settings)
    loss = local_sgd(
        model,
        data,
        steps=todo.local_batches,
        batch_size=todo.batch_size,
        lr=todo.lr,
        lr_decay=todo.lr_decay,
        momentum=todo.momentum,
        step_offset=turns * todo.local_batches,
        generator=rng,
        extra=extra,
    )
    if len(data) == 0 and not active:
        loss = 0.0  # a passive attacker without data uploads nothing new; report like others

    turns += 1
    store.save(generator, turns)
    if turns == 1 or turns % attack.sample_every == 0:
        samples = SampleSet(
            attacker=spec.index,
            round=todo.server_round,
            mode=spec.mode,
            target=target,
            fake=fake,
            images=fixed_samples(generator, attack.num_samples, seed).numpy(),
            turns=turns,
            device=str(device),
        )
        participant_reporter(spec, settings).send(samples)
    return train_reply(msg, model, loss, len(data))
