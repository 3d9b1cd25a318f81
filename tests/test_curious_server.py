"""The curious server: a strategy wrapper that inverts every individual update it sees, reports
the reconstruction, and changes nothing about the federation."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedleak import inbox
from fedleak.attacker.inversion import idlg_label
from fedleak.errors import ConfigError
from fedleak.models import build_classifier
from fedleak.protocol import Instructions
from fedleak.records import ReconstructionReport
from fedleak.reporting import Reporter
from fedleak.roles import SERVER_WRAPPERS, resolve
from fedleak.settings import load_federation


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore import task_identity

    monkeypatch.setattr(task_identity.TaskIdentity, "_task_id", "t", raising=False)
    monkeypatch.setattr(task_identity.TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(task_identity.TaskIdentity, "_node_id", 0, raising=False)


def _trained(model: torch.nn.Module, x, y, lr: float) -> torch.nn.Module:
    import copy

    out = copy.deepcopy(model)
    loss = torch.nn.functional.cross_entropy(out(x), y)
    loss.backward()
    with torch.no_grad():
        for p in out.parameters():
            p -= lr * p.grad
    return out


def test_curious_server_sees_individual_updates_and_changes_nothing(tmp_path, monkeypatch):
    seen = []

    def fake_invert(model, obs, *args, **kwargs):
        seen.append(obs)
        return {"images": torch.zeros(1, 3, 32, 32), "labels": torch.tensor([3]), "kind": "fedsgd"}

    monkeypatch.setattr("fedleak.attacker.curious_server.invert", fake_invert)

    class Inner:
        last_round = {"aggregated": [0]}

        def configure_train(self, server_round, arrays, config, grid):
            return [Message(RecordDict({"config": config}), dst_node_id=1, message_type="train")]

        def aggregate_train(self, server_round, replies):
            return "aggregated", len(list(replies))

    torch.manual_seed(0)
    model = build_classifier("dlg-lenet", 10)
    settings = load_federation("fedsgd-cifar", ["server.inversion-rounds=1"])
    reporter = Reporter("server", "", tmp_path / "inbox")  # no collector: kept locally
    server = resolve(SERVER_WRAPPERS["curious"])(Inner(), model, settings, reporter)
    todo = Instructions(server_round=1, protocol="fedsgd", lr=0.1, batch_size=1)
    server.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(todo.to_record()), None)
    x, y = torch.rand(1, 3, 32, 32), torch.tensor([3])
    reply = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(_trained(model, x, y, 0.1).state_dict()),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        ),
        dst_node_id=0,
        message_type="train",
    )
    assert server.aggregate_train(1, [reply]) == ("aggregated", 1)
    assert server.last_round == {"aggregated": [0]}  # the wrapped strategy's bookkeeping
    assert len(seen) == 1 and idlg_label(seen[0]) == 3
    (report,) = [inbox.read(p).record() for p in inbox.entries(tmp_path / "inbox")]
    assert isinstance(report, ReconstructionReport) and report.threat == "server"
    assert report.round == 1 and report.labels.tolist() == [3] and report.error is None
    assert server.aggregate_train(2, [reply]) == ("aggregated", 1)  # past inversion-rounds
    assert len(seen) == 1


def test_inversion_settings_are_checked():
    with pytest.raises(ConfigError, match="fedsgd or fedavg"):
        load_federation("fedsgd-cifar", ['run.protocol="collaborative"'])
    with pytest.raises(ConfigError, match="examples-per-round"):
        load_federation("fedsgd-cifar", ['run.protocol="fedavg"'])
    with pytest.raises(ConfigError, match="plain SGD"):
        load_federation("fedsgd-cifar", ["train.momentum=0.9"])
    with pytest.raises(ConfigError, match="unknown attack 'nope'"):
        load_federation("fedsgd-cifar", ['server.inversion="nope"'])


def test_prior_attacks_are_refused_in_the_federation_with_a_reason():
    with pytest.raises(ConfigError, match="needs a generative prior"):
        load_federation("fedsgd-cifar", ['attack.inversion="gias"'])
