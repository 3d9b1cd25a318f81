"""The attacker's ClientApp step: same reply form as an honest client, G persists, G learns."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedleak import inbox
from fedleak.attacker.gan import train_generator
from fedleak.attacker.generator_store import GeneratorStore
from fedleak.attacker.model_inversion import invert
from fedleak.clients.app import train
from fedleak.models import build_classifier, build_generator
from fedleak.models.hitaj import sample_noise
from fedleak.protocol import Instructions
from fedleak.records import NodeReport, SampleSet
from fedleak.settings import load_federation
from fedleak.settings.flower import to_run_config


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in {"_task_id": 1, "_run_id": 1, "_node_id": 7}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def _setup(tmp_path, index):
    settings = load_federation(
        "smoke",
        [
            "train.local-batches=2",
            "attack.gen-steps=2",
            f'participants.1.state-dir="{tmp_path / "state"}"',
            f'participants.1.out-dir="{tmp_path / "out"}"',
            f'participants.0.out-dir="{tmp_path / "honest"}"',
        ],
    )
    run_config = to_run_config(settings, include_participants=True)
    context = Context(1, 7, {"partition-id": index}, RecordDict(), run_config)
    torch.manual_seed(0)
    model = build_classifier("hitaj-mnist", 11)
    todo = Instructions(server_round=1, protocol="fedavg", lr=1e-3, batch_size=8, local_batches=2)
    config = ConfigRecord(todo.to_record())
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return context, Message(content=content, dst_node_id=7, message_type="train")


def test_attacker_reply_looks_like_an_honest_reply(tmp_path):
    replies = []
    for index in (0, 1):
        context, msg = _setup(tmp_path, index)
        replies.append(train(msg, context))
    honest, attacker = replies
    assert set(honest.content.keys()) == set(attacker.content.keys())
    assert set(honest.content.metric_records["metrics"].keys()) == set(
        attacker.content.metric_records["metrics"].keys()
    )
    assert list(honest.content.array_records["arrays"].keys()) == list(
        attacker.content.array_records["arrays"].keys()
    )
    # Without a collector, what the attacker reports stays in its own folder's inbox.
    kept = [inbox.read(p).record() for p in inbox.entries(tmp_path / "out" / "inbox")]
    samples = [r for r in kept if isinstance(r, SampleSet)]
    assert len(samples) == 1 and samples[0].round == 1 and samples[0].target == 0
    assert samples[0].images.shape == (20, 1, 32, 32)
    assert {r.participant for r in kept if isinstance(r, NodeReport)} == {1}
    assert (tmp_path / "state" / "generator.pt").exists()


def test_generator_survives_a_node_restart(tmp_path):
    context = Context(1, 7, {}, RecordDict(), {})
    g = build_generator("hitaj-mnist")
    GeneratorStore(context, str(tmp_path)).save(g, turns=5)
    restarted = Context(1, 7, {}, RecordDict(), {})  # a fresh SuperNode has empty state
    g2 = build_generator("hitaj-mnist")
    assert GeneratorStore(restarted, str(tmp_path)).load(g2) == 5
    for a, b in zip(g.state_dict().values(), g2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # Without a state folder, the node's in-memory state keeps G between turns.
    GeneratorStore(context, None).save(g, turns=2)
    assert GeneratorStore(context, None).load(build_generator("hitaj-mnist")) == 2


def test_generator_learns_what_the_discriminator_calls_the_target():
    torch.manual_seed(0)
    # A discriminator with a known opinion: class 3 means "bright image".
    d = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 11))
    with torch.no_grad():
        d[1].weight.zero_()
        d[1].bias.zero_()
        d[1].weight[3] = 0.01
    g = build_generator("hitaj-mnist")
    z = sample_noise(64, generator=torch.Generator().manual_seed(1))

    def target_prob() -> float:
        g.train()
        with torch.no_grad():
            return torch.softmax(d(g(z)), 1)[:, 3].mean().item()

    before = target_prob()
    train_generator(g, d, 3, steps=30, batch=32, lr=0.02, rng=torch.Generator().manual_seed(2))
    assert target_prob() > max(0.5, 3 * before)
    assert all(not p.requires_grad for p in d.parameters())  # D stays a frozen replica


def test_model_inversion_raises_target_probability():
    torch.manual_seed(0)
    model = build_classifier("hitaj-mnist", 11)
    images = invert(model, 2, (1, 32, 32), num=4, steps=50, lr=0.5)
    assert images.shape == (4, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        p = torch.softmax(model(images), 1)[:, 2].mean().item()
        p0 = torch.softmax(model(torch.full((1, 1, 32, 32), -0.9)), 1)[0, 2].item()
    assert p > p0
    assert np.isfinite(images.numpy()).all()
