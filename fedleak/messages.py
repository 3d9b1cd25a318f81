"""Reading and writing the federation's training messages, the same way on every node.

A training message carries the global model (``arrays``) and the round's instructions
(``config``); a reply carries the trained model and its metrics (``num-examples`` above all, the
weight FedAvg gives it). Honest clients and attackers reply alike, so the server cannot tell
them apart.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedleak import protocol
from fedleak.models import build_classifier
from fedleak.settings import FederationSettings


def instructions(msg: Message) -> protocol.Instructions:
    return protocol.Instructions.from_record(dict(msg.content.config_records[protocol.CONFIG]))


def received_model(msg: Message, settings: FederationSettings) -> torch.nn.Module:
    """The model this message carries, built from the run's model settings."""
    model = build_classifier(settings.model.name, settings.model.num_classes)
    model.load_state_dict(msg.content.array_records[protocol.ARRAYS].to_torch_state_dict())
    return model


def train_reply(
    msg: Message, model: torch.nn.Module, loss: float, examples: int, **metrics: float
) -> Message:
    """The reply every participant sends: its model after training, the mean loss and the number
    of examples behind the update."""
    values = {protocol.TRAIN_LOSS: float(loss), protocol.NUM_EXAMPLES: max(1, int(examples))}
    values.update(metrics)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    content = RecordDict(
        {protocol.ARRAYS: ArrayRecord(state), protocol.METRICS: MetricRecord(values)}
    )
    return Message(content=content, reply_to=msg)
