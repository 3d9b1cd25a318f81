"""An honest participant's turn: train the received model on its private partition exactly as the
server declared, and send it back."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message

from fedleak.messages import instructions, received_model, train_reply
from fedleak.settings import FederationSettings
from fedleak.settings.flower import NodeIdentity
from fedleak.training import device_for, train_on_instructions

PROGRESS_KEY = "training"  # node state: SGD steps taken so far (the learning-rate decay's clock)


def steps_done(context: Context) -> int:
    record = context.state.config_records.get(PROGRESS_KEY)
    return int(record["steps"]) if record is not None else 0


def train(
    msg: Message, context: Context, identity: NodeIdentity, settings: FederationSettings
) -> Message:
    todo = instructions(msg)
    model = received_model(msg, settings).to(device_for(settings))
    done = steps_done(context)
    loss, examples = train_on_instructions(model, identity.spec, settings, todo, done)
    if not todo.fixed_examples:
        context.state[PROGRESS_KEY] = ConfigRecord({"steps": done + todo.local_batches})
    return train_reply(msg, model, loss, examples)
