"""A Byzantine participant (mode "byzantine"): it trains like everyone else, then lies in its
reply in one chosen way (its ``lie`` setting). It probes the server's reply checks: a lie must be
refused with its reason and never reach aggregation, and the run must stay truthful about it.

Lies about the declared example count (FedAvg's weight), about the arrays' values, dtypes and
shapes, about the records a reply carries, and an update that is finite but huge.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord

from fedleak import protocol
from fedleak.messages import instructions, received_model, train_reply
from fedleak.settings import FederationSettings
from fedleak.settings.flower import NodeIdentity
from fedleak.training import train_on_instructions

EXAMPLES = {
    "zero-examples": 0,
    "negative-examples": -5,
    "nan-examples": float("nan"),
    "inf-examples": float("inf"),
    "huge-examples": 1e9,  # one reply would outweigh everyone else's together
    "fractional-examples": 2.5,
}


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content.array_records[protocol.ARRAYS].items()}


def _set_arrays(reply: Message, arrays: dict[str, np.ndarray]) -> None:
    reply.content[protocol.ARRAYS] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
    )


def lie(reply: Message, how: str) -> Message:
    """Corrupt an honest reply in place, the way ``how`` names."""
    arrays = _arrays(reply)
    first = next(iter(arrays))
    metrics = reply.content.metric_records[protocol.METRICS]
    if how in EXAMPLES:
        metrics[protocol.NUM_EXAMPLES] = EXAMPLES[how]
    elif how == "nan-weights":
        arrays[first] = np.full_like(arrays[first], np.nan)
    elif how == "float64-overflow":  # finite as float64, inf once cast to the model's float32
        arrays = {k: v.astype(np.float64) for k, v in arrays.items()}
        arrays[first][...] = 1e300
    elif how == "int-weights":
        arrays = {k: v.astype(np.int64) for k, v in arrays.items()}
    elif how == "bool-weights":
        arrays = {k: v != 0 for k, v in arrays.items()}
    elif how == "wrong-shape":
        arrays[first] = np.zeros((*arrays[first].shape, 2), arrays[first].dtype)
    elif how == "huge-update":  # finite, right dtype: only a norm bound catches it
        arrays = {k: v + np.asarray(1e6, v.dtype) for k, v in arrays.items()}
    elif how == "missing-metrics":
        del reply.content[protocol.METRICS]
    elif how == "extra-records":
        reply.content["more-metrics"] = MetricRecord({protocol.NUM_EXAMPLES: 1e9})
    else:
        raise ValueError(f"unknown lie {how!r}")
    if how not in EXAMPLES and how not in ("missing-metrics", "extra-records"):
        _set_arrays(reply, arrays)
    return reply


def train(
    msg: Message, context: Context, identity: NodeIdentity, settings: FederationSettings
) -> Message:
    model = received_model(msg, settings)
    loss, examples = train_on_instructions(model, identity.spec, settings, instructions(msg))
    return lie(train_reply(msg, model, loss, examples), identity.spec.lie)
