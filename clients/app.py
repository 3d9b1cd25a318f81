"""The ClientApp every SuperNode runs. Honest participants train on their partition; a node
whose node config says role="attacker" runs the attacker's training instead. Both reply with the
same records and metric keys, so the server cannot tell them apart."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedleak.clients.collaborative_mod import collaborative_mod
from fedleak.clients.participant import Participant, local_data, participant
from fedleak.clients.privacy_mods import local_dp_mod, update_defense_mod
from fedleak.clients.training import local_sgd, round_examples, sgd_on_examples
from fedleak.data import load_dataset
from fedleak.metrics.classification import accuracy
from fedleak.models import build_classifier

# Outermost first: Flower's local DP noises what the update defenses left, on fedavg/fedsgd.
app = ClientApp(mods=[local_dp_mod, update_defense_mod, collaborative_mod])

PROGRESS_KEY = "training"


def model_from(msg: Message, context: Context) -> torch.nn.Module:
    model = build_classifier(
        str(context.run_config["model.name"]), int(context.run_config["model.num-classes"])
    )
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


def steps_done(context: Context) -> int:
    record = context.state.config_records.get(PROGRESS_KEY)
    return int(record["steps"]) if record is not None else 0


def reply(msg: Message, model: torch.nn.Module, loss: float, examples: int) -> Message:
    metrics = MetricRecord({"train-loss": float(loss), "num-examples": max(1, examples)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    me = participant(context)
    if me.is_attacker and me.settings.get("mode") == "inversion":
        from fedleak.attacker.inversion_client import inversion_attacker_train

        return inversion_attacker_train(msg, context, me)
    if me.is_attacker:
        from fedleak.attacker.gan import attacker_train  # the attack's code loads only on its node

        return attacker_train(msg, context, me)
    return honest_train(msg, context, me)


def honest_train(msg: Message, context: Context, me: Participant) -> Message:
    model, loss, examples = train_locally(msg, context, me)
    return reply(msg, model, loss, examples)


def round_batch(
    me: Participant, run_config: dict, config: ConfigRecord
) -> tuple[torch.Tensor, ...]:
    """The examples this participant trains on this round (fedsgd, or fedavg with
    examples-per-round): a fixed draw from its partition, recomputable by the evaluation."""
    data = local_data(me, run_config)
    count = int(
        config["batch-size"] if config["protocol"] == "fedsgd" else config["examples-per-round"]
    )
    idx = round_examples(
        len(data), count, int(run_config["run.seed"]), me.index, int(config["server-round"])
    )
    return data.images[idx], data.labels[idx]


def train_locally(
    msg: Message, context: Context, me: Participant
) -> tuple[torch.nn.Module, float, int]:
    """The agreed local training on the received model: (model, mean loss, examples used)."""
    config = msg.content.config_records["config"]
    model = model_from(msg, context)
    protocol = str(config.get("protocol", "fedavg"))
    if protocol == "fedsgd" or int(config.get("examples-per-round", 0)) > 0:
        images, labels = round_batch(me, context.run_config, config)
        loss = sgd_on_examples(
            model,
            images,
            labels,
            steps=1 if protocol == "fedsgd" else int(config["local-batches"]),
            batch_size=int(config["batch-size"]),
            lr=float(config["lr"]),
        )
        return model, loss, len(images)
    data = local_data(me, context.run_config)
    gen = torch.Generator().manual_seed(
        int(context.run_config["run.seed"]) * 1000 + me.index + 7 * int(config["server-round"])
    )
    offset = steps_done(context)
    loss = local_sgd(
        model,
        data,
        steps=int(config["local-batches"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        lr_decay=float(config["lr-decay"]),
        momentum=float(config["momentum"]),
        step_offset=offset,
        generator=gen,
    )
    context.state[PROGRESS_KEY] = ConfigRecord({"steps": offset + int(config["local-batches"])})
    return model, loss, len(data)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the received model on this participant's own classes of the test set."""
    me = participant(context)
    model = model_from(msg, context)
    test = load_dataset(
        str(context.run_config["data.dataset"]),
        "test",
        str(context.run_config["data.root"]) or None,
    )
    if me.classes:
        test = test.of_classes(me.classes)
    acc = accuracy(model, test.images, test.labels) if len(test) else 0.0
    metrics = MetricRecord({"eval-accuracy": acc, "num-examples": max(1, len(test))})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
