"""The adversarial client of the gradient-inversion threat model (participant mode "inversion").

It follows the protocol exactly: it trains on its own partition and replies like an honest client.
It also remembers the global model it was sent and its own update. When the next round's global
model arrives, the difference isolates the other clients' update of the previous round
(``attacker.federated_inversion``), which it inverts and reports to the experimenter; the
federation never sees the reconstruction.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from fedleak import protocol
from fedleak.attacker.federated_inversion import (
    Protocol,
    individual_update,
    invert,
    isolate_others,
    observation_from_update,
    update_norm,
)
from fedleak.attacker.inversion_reports import failure_report, reconstruction_report
from fedleak.data import image_shape
from fedleak.messages import instructions, received_model, train_reply
from fedleak.reporting import participant_reporter
from fedleak.settings import FederationSettings
from fedleak.settings.flower import NodeIdentity
from fedleak.training import device_for, train_on_instructions

log = logging.getLogger(__name__)

PREVIOUS_GLOBAL = "inversion.previous-global"
PREVIOUS_OWN = "inversion.previous-own"
PREVIOUS_ROUND = "inversion.previous"  # the previous round's Instructions


def train(
    msg: Message, context: Context, identity: NodeIdentity, settings: FederationSettings
) -> Message:
    todo = instructions(msg)
    received = msg.content.array_records[protocol.ARRAYS]
    model = received_model(msg, settings).to(device_for(settings))
    loss, examples = train_on_instructions(model, identity.spec, settings, todo)
    model = model.cpu()
    where = {"threat": "client", "round": todo.server_round - 1, "attacker": identity.spec.index}
    try:
        report = _attack_previous_round(msg, context, identity, settings, received, todo)
    except Exception as err:  # the attack failing must not change what the federation sees
        log.warning("inversion of round %d failed: %s", todo.server_round - 1, err)
        report = failure_report(err, **where)
    if report is not None:
        participant_reporter(identity.spec, settings).send(report)
    own = individual_update(model, received, ArrayRecord(model.state_dict()))
    context.state[PREVIOUS_GLOBAL] = received
    context.state[PREVIOUS_OWN] = ArrayRecord([u.numpy() for u in own])
    context.state[PREVIOUS_ROUND] = ConfigRecord(todo.to_record())
    return train_reply(msg, model, loss, examples)


def _attack_previous_round(
    msg: Message,
    context: Context,
    identity: NodeIdentity,
    settings: FederationSettings,
    received: ArrayRecord,
    todo: protocol.Instructions,
):
    previous = context.state.array_records.get(PREVIOUS_GLOBAL)
    meta = context.state.config_records.get(PREVIOUS_ROUND)
    if previous is None or meta is None:
        return None  # first turn: no consecutive pair to difference
    before = protocol.Instructions.from_record(dict(meta))
    if before.server_round != todo.server_round - 1:
        return None  # a round was missed
    if before.server_round > identity.attack.inversion_rounds:
        return None
    model = received_model(msg, settings)
    own = [
        torch.from_numpy(a.copy())
        for a in context.state.array_records[PREVIOUS_OWN].to_numpy_ndarrays()
    ]
    cohort = before.cohort_size or 2
    others = isolate_others(model, previous, received, own, cohort)
    shape = image_shape(settings.data.dataset)
    observed = Protocol.from_config(before.to_record(), settings.model.num_classes, shape)
    observation = observation_from_update(previous, others, observed, clients=cohort - 1)
    attack = identity.attack
    result = invert(
        model,
        observation,
        attack.inversion,
        attack.inversion_iterations,
        attack.inversion_restarts,
        seed=settings.run.seed,
    )
    return reconstruction_report(
        result,
        threat="client",
        round=before.server_round,
        attacker=identity.spec.index,
        isolated="exact" if cohort == 2 else f"aggregate of {cohort - 1} clients",
        update_norm=update_norm(others),
        device="cpu",
    )
