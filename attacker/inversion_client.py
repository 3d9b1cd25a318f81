"""The adversarial client of the gradient-inversion threat model (participant mode "inversion").

It follows the protocol exactly: it trains on its own partition and replies like an honest client.
It also remembers the global model it was sent and its own update. When the next round's global
model arrives, the difference isolates the other clients' update of the previous round
(``attacker.federated_inversion``), which it inverts; the reconstruction goes to its own
out-dir, never to the federation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from fedleak.attacker.federated_inversion import (
    Protocol,
    individual_update,
    invert,
    isolate_others,
    observation_from_update,
    save_reconstruction,
    update_norm,
)
from fedleak.clients.app import model_from, reply, train_locally
from fedleak.clients.participant import Participant
from fedleak.data import image_shape

log = logging.getLogger(__name__)

PREVIOUS_GLOBAL = "inversion.previous-global"
PREVIOUS_OWN = "inversion.previous-own"
PREVIOUS_META = "inversion.previous"


def inversion_attacker_train(msg: Message, context: Context, me: Participant) -> Message:
    config = msg.content.config_records["config"]
    received = msg.content.array_records["arrays"]
    server_round = int(config["server-round"])
    model, loss, examples = train_locally(msg, context, me)
    try:
        _attack_previous_round(msg, context, me, received, server_round)
    except Exception as err:  # the attack failing must not change what the federation sees
        log.warning("inversion of round %d failed: %s", server_round - 1, err)
        _write_failure(me, server_round - 1, err)
    own = individual_update(model, received, ArrayRecord(model.state_dict()))
    context.state[PREVIOUS_GLOBAL] = received
    context.state[PREVIOUS_OWN] = ArrayRecord([u.numpy() for u in own])
    context.state[PREVIOUS_META] = ConfigRecord(
        {
            "round": server_round,
            "cohort": int(config.get("cohort-size", 2)),
            "protocol": str(config["protocol"]),
            "lr": float(config["lr"]),
            "batch-size": int(config["batch-size"]),
            "examples-per-round": int(config.get("examples-per-round", 0)),
            "local-batches": int(config["local-batches"]),
        }
    )
    return reply(msg, model, loss, examples)


def _attack_previous_round(
    msg: Message, context: Context, me: Participant, received: ArrayRecord, server_round: int
) -> None:
    previous = context.state.array_records.get(PREVIOUS_GLOBAL)
    meta = context.state.config_records.get(PREVIOUS_META)
    if previous is None or meta is None or int(meta["round"]) != server_round - 1:
        return  # first turn, or a round was missed: no consecutive pair to difference
    attacked = int(meta["round"])
    if attacked > int(me.attack("inversion-rounds")):
        return
    model = model_from(msg, context)
    own = [
        torch.from_numpy(a.copy())
        for a in context.state.array_records[PREVIOUS_OWN].to_numpy_ndarrays()
    ]
    cohort = int(meta["cohort"])
    others = isolate_others(model, previous, received, own, cohort)
    dataset = str(context.run_config["data.dataset"])
    protocol = Protocol.from_config(
        meta, int(context.run_config["model.num-classes"]), image_shape(dataset)
    )
    observation = observation_from_update(previous, others, protocol, clients=cohort - 1)
    record = invert(
        model,
        observation,
        str(me.attack("inversion")),
        int(me.attack("inversion-iterations")),
        int(me.attack("inversion-restarts")),
        seed=int(context.run_config["run.seed"]),
    )
    record.update(
        round=attacked,
        threat="client",
        isolated="exact" if cohort == 2 else f"aggregate of {cohort - 1} clients",
        update_norm=update_norm(others),
    )
    folder = _out_dir(me) / "inversions"
    save_reconstruction(folder, f"round-{attacked:04d}", record)


def _out_dir(me: Participant) -> Path:
    out = me.settings.get("out-dir") or ""
    if not out:
        raise ValueError("the inversion attacker needs an out-dir for its reconstructions")
    return Path(str(out))


def _write_failure(me: Participant, attacked: int, err: Exception) -> None:
    try:
        save_reconstruction(
            _out_dir(me) / "inversions",
            f"round-{attacked:04d}",
            {"round": attacked, "threat": "client", "error": f"{type(err).__name__}: {err}"},
        )
    except Exception as inner:  # nowhere to write: the log line above is all there is
        log.warning("cannot record the failure: %s", inner)
