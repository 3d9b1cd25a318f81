"""Gradient inversion's federated plumbing: the client computation the attacks model, isolating
the victim's update from consecutive global models, and the curious-server wrapper."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedleak.attacker.federated_inversion import (
    Protocol,
    individual_update,
    isolate_others,
    observation_from_update,
)
from fedleak.attacker.inversion import fedavg_update, fedsgd_update, idlg_label
from fedleak.models import build_classifier
from fedleak.training import round_examples, sgd_on_examples

torch.set_num_threads(1)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("dlg-lenet", 10)


def _trained(model: torch.nn.Module, x, y, steps: int, batch: int, lr: float):
    copy = _model()
    copy.load_state_dict(model.state_dict())
    sgd_on_examples(copy, x, y, steps=steps, batch_size=batch, lr=lr)
    return copy


def _fedavg(records: list[ArrayRecord], weights: list[int]) -> ArrayRecord:
    """Flower's own FedAvg aggregation of the replies, weighted by their example counts."""
    return aggregate_arrayrecords(
        [
            RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": w})})
            for r, w in zip(records, weights, strict=True)
        ],
        "num-examples",
    )


def test_round_examples_is_a_pure_function_of_its_arguments():
    a = round_examples(100, 4, seed=0, index=1, server_round=3)
    assert torch.equal(a, round_examples(100, 4, seed=0, index=1, server_round=3))
    assert not torch.equal(a, round_examples(100, 4, seed=0, index=0, server_round=3))
    assert not torch.equal(a, round_examples(100, 4, seed=0, index=1, server_round=4))
    with pytest.raises(ValueError):
        round_examples(3, 4, seed=0, index=0, server_round=1)


def test_client_training_is_what_the_attacks_simulate():
    """The honest client's SGD equals the attack's model of it (fedavg_update), step for step."""
    model = _model()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    trained = _trained(model, x, y, steps=4, batch=2, lr=0.05)
    expected = fedavg_update(model, x, y, steps=4, lr=0.05, batch_size=2)
    got = individual_update(
        model, ArrayRecord(model.state_dict()), ArrayRecord(trained.state_dict())
    )
    for g, e in zip(got, expected.update, strict=True):
        assert torch.allclose(g, e, atol=1e-6)


def test_adversarial_client_isolates_the_victims_update_exactly():
    model = _model()
    sent = ArrayRecord(model.state_dict())
    xv, yv = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([7])
    xa, ya = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([2])
    victim, attacker = _trained(model, xv, yv, 1, 1, 0.1), _trained(model, xa, ya, 1, 1, 0.1)
    new_global = _fedavg(
        [ArrayRecord(victim.state_dict()), ArrayRecord(attacker.state_dict())], [1, 1]
    )
    own = individual_update(model, sent, ArrayRecord(attacker.state_dict()))
    others = isolate_others(model, sent, new_global, own, cohort=2)
    protocol = Protocol("fedsgd", 0.1, 1, 1, 1, 10, (3, 32, 32))
    obs = observation_from_update(sent, others, protocol)
    truth = fedsgd_update(model, xv, yv)
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([u.flatten() for u in obs.update]),
        torch.cat([u.flatten() for u in truth.update]),
        dim=0,
    )
    assert cos > 0.999
    for o, t in zip(obs.update, truth.update, strict=True):
        assert torch.allclose(o, t, rtol=1e-2, atol=1e-4)  # float32 round trips through params
    assert idlg_label(obs) == 7


def test_with_several_victims_the_attacker_gets_their_aggregate():
    model = _model()
    sent = ArrayRecord(model.state_dict())
    xs = torch.rand(3, 1, 3, 32, 32) * 2 - 1
    ys = torch.tensor([[1], [4], [6]])
    clients = [_trained(model, x, y, 1, 1, 0.1) for x, y in zip(xs, ys, strict=True)]
    new_global = _fedavg([ArrayRecord(c.state_dict()) for c in clients], [1, 1, 1])
    own = individual_update(model, sent, ArrayRecord(clients[2].state_dict()))
    others = isolate_others(model, sent, new_global, own, cohort=3)
    protocol = Protocol("fedsgd", 0.1, 1, 1, 1, 10, (3, 32, 32))
    obs = observation_from_update(sent, others, protocol, clients=2)
    truth = fedsgd_update(model, xs[:2].flatten(0, 1), ys[:2].flatten())
    assert obs.batch_size == 2
    for o, t in zip(obs.update, truth.update, strict=True):
        assert torch.allclose(o, t, rtol=1e-2, atol=1e-4)


def test_invert_records_the_work_the_attack_did():
    """The saved record carries iterations, evaluations, wall time, the chosen restart and every
    restart's final loss; the federation's stopping rule prunes the worse half at every step."""
    from fedleak.attacker.federated_inversion import STOPPING, WORK_FIELDS, invert

    model = _model()
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([5])
    record = invert(model, fedsgd_update(model, x, y), "idlg", iterations=7, restarts=4)
    assert set(WORK_FIELDS) <= set(record) and record["seconds"] > 0
    assert STOPPING["prune_every"] == 1
    # Four restarts run a step together, the better two one more, the best one to the budget.
    assert sorted(record["per_restart_iterations"]) == [1, 1, 2, 7]
    best = record["restart"]
    assert record["iterations"] == record["per_restart_iterations"][best] == 7
    assert record["per_restart_loss"][best] == min(record["per_restart_loss"])
    assert record["evaluations"] == sum(record["per_restart_evaluations"])
    assert all(
        e > i
        for e, i in zip(
            record["per_restart_evaluations"], record["per_restart_iterations"], strict=True
        )
    )
    assert len(record["loss_history"]) == 7
    assert record["seed"] == "rescaled" and record["stopped"] == "budget"


def test_invert_leaves_adam_attacks_to_their_schedule():
    from fedleak.attacker.federated_inversion import invert, stopping_for

    assert stopping_for("inverting-gradients") == {}
    model = _model()
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([2])
    record = invert(model, fedsgd_update(model, x, y), "inverting-gradients", 4, 2)
    assert record["per_restart_iterations"] == [4, 4] and record["stopped"] == "budget"
