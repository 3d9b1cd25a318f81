"""The client mods that protect honest updates in the federation (defense.* settings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedleak.clients.app import app
from fedleak.errors import ConfigError
from fedleak.models import build_classifier
from fedleak.protocol import Instructions
from fedleak.settings import load_federation
from fedleak.settings.flower import to_run_config


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in {"_task_id": 1, "_run_id": 1, "_node_id": 7}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def _update(overrides: list[str], tmp_path, index: int = 0) -> tuple[list[np.ndarray], float]:
    """One FedSGD round through the real ClientApp (with its mods): the update it sends."""
    torch.set_num_threads(1)
    settings = load_federation(
        "fedsgd-cifar",
        ["train.lr=1.0", f'deployment.node-root="{tmp_path}"', *overrides],
    )
    context = Context(
        1,
        7,
        {"partition-id": index},
        RecordDict(),
        to_run_config(settings, include_participants=True),
    )
    torch.manual_seed(0)
    model = build_classifier("dlg-lenet", 10)
    sent = ArrayRecord(model.state_dict())
    todo = Instructions(server_round=1, protocol="fedsgd", lr=1.0, batch_size=1, cohort_size=2)
    config = ConfigRecord(todo.to_record())
    msg = Message(
        RecordDict({"arrays": sent, "config": config}), dst_node_id=7, message_type="train"
    )
    reply = app(msg, context)
    assert isinstance(reply.content.metric_records["metrics"], MetricRecord)
    after = reply.content.array_records["arrays"].to_numpy_ndarrays()
    update = [a - b for a, b in zip(after, sent.to_numpy_ndarrays(), strict=True)]
    return update, float(np.sqrt(sum((u.astype(np.float64) ** 2).sum() for u in update)))


def test_clipping_bounds_the_honest_update(tmp_path):
    _, plain = _update([], tmp_path)
    assert plain > 0.5
    _, clipped = _update(['defense.client="clip:0.5"'], tmp_path)
    assert clipped == pytest.approx(0.5, rel=1e-3)


def test_topk_sparsifies_each_layer(tmp_path):
    update, _ = _update(['defense.client="topk:0.1"'], tmp_path)
    for u in update:
        assert np.count_nonzero(u) <= int(np.ceil(0.1 * u.size))


def test_flowers_local_dp_clips_and_adds_noise(tmp_path):
    _, plain = _update([], tmp_path)
    update, noised = _update(
        ["defense.local-dp-epsilon=1.0", "defense.local-dp-clip=0.1"], tmp_path
    )
    # Clipped to 0.1, then Gaussian noise with std 0.1 * sqrt(2 ln(1.25/1e-5)) / 1 ~ 0.48 per entry.
    std = float(np.concatenate([u.ravel() for u in update]).std())
    assert 0.4 < std < 0.6
    assert noised != pytest.approx(plain)


def test_the_attacker_does_not_defend_its_own_update(tmp_path):
    """It runs its own software: it must know exactly what it sent to isolate the victim."""
    _, honest = _update(['defense.client="clip:0.01"'], tmp_path, index=0)
    _, attacker = _update(['defense.client="clip:0.01"'], tmp_path, index=1)
    assert honest == pytest.approx(0.01, rel=1e-3)
    assert attacker > 0.5


def test_bad_defense_settings_are_rejected():
    with pytest.raises(ConfigError, match="defense.client"):
        load_federation("fedsgd-cifar", ['defense.client="topk:2"'])
    with pytest.raises(ConfigError, match="collaborative"):
        load_federation("smoke", ['defense.client="clip:1"'])
    with pytest.raises(ConfigError, match="local-dp-clip"):
        load_federation("fedsgd-cifar", ["defense.local-dp-clip=0.0"])
