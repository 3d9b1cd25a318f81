"""Client mod for the collaborative protocol: partial download in, sparse update out.

Composes with any ClientApp that trains the arrays it receives and returns new arrays: the mod
keeps the participant's local model in the node's state, merges in the downloaded fraction,
and replaces the reply's parameters with the selected (optionally DP) update.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedleak import protocol
from fedleak.collaborative import dp_select_upload, select_upload

LOCAL_KEY = "collaborative.local-model"  # node state: the participant's own full model


def _flat(record: ArrayRecord) -> tuple[list[str], list[np.ndarray]]:
    return list(record.keys()), record.to_numpy_ndarrays()


def _record(keys: list[str], arrays: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(a)) for k, a in zip(keys, arrays, strict=True)}
    )


def collaborative_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    config = msg.content.config_records.get(protocol.CONFIG)
    kind = config.get("protocol") if config is not None else None
    if kind != "collaborative" or msg.metadata.message_type != "train":
        return call_next(msg, context)

    keys, downloaded = _flat(msg.content.array_records[protocol.ARRAYS])
    local = context.state.array_records.get(LOCAL_KEY)
    mask_record = msg.content.array_records.get(protocol.DOWNLOAD_MASK)
    if mask_record is not None and local is None:
        # Restarted node: a partial download cannot be merged into a model it no longer has.
        return _resync_reply(msg, keys, downloaded)
    if mask_record is not None:
        masks = mask_record.to_numpy_ndarrays()
        _, own = _flat(local)
        merged = [np.where(m, d, o) for m, d, o in zip(masks, downloaded, own, strict=True)]
    else:
        merged = downloaded
    msg.content[protocol.ARRAYS] = _record(keys, merged)
    if protocol.DOWNLOAD_MASK in msg.content.array_records:
        del msg.content[protocol.DOWNLOAD_MASK]

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    new_keys, trained = _flat(reply.content.array_records[protocol.ARRAYS])
    if new_keys != keys:
        raise ValueError("collaborative_mod: the ClientApp changed the parameter names")
    context.state[LOCAL_KEY] = _record(keys, trained)

    theta_u, tau = float(config["theta-u"]), float(config["tau"])
    gamma, epsilon = float(config["gamma"]), float(config["dp-epsilon"])
    deltas = [(t - m).astype(np.float32) for t, m in zip(trained, merged, strict=True)]
    flat = np.concatenate([d.ravel() for d in deltas])
    if epsilon > 0:
        seed = int(config.get("server-round", 0)) * 7919 + context.node_id % 7919
        shared = dp_select_upload(flat, theta_u, tau, gamma, epsilon, np.random.default_rng(seed))
    else:
        shared = select_upload(flat, theta_u, tau, gamma)
    pieces = np.split(shared, np.cumsum([d.size for d in deltas])[:-1])
    reply.content[protocol.ARRAYS] = _record(
        keys, [p.reshape(d.shape) for p, d in zip(pieces, deltas, strict=True)]
    )
    metrics = reply.content.metric_records.get(protocol.METRICS)
    if metrics is not None:
        metrics[protocol.UPLOADED_FRACTION] = float(np.count_nonzero(shared)) / shared.size
        metrics[protocol.RESYNC] = 0.0
    return reply


def _resync_reply(msg: Message, keys: list[str], downloaded: list[np.ndarray]) -> Message:
    """Upload nothing this turn and ask for a full download next turn."""
    zeros = _record(keys, [np.zeros_like(d) for d in downloaded])
    metrics = MetricRecord(
        {
            protocol.TRAIN_LOSS: 0.0,
            protocol.NUM_EXAMPLES: 1,
            protocol.UPLOADED_FRACTION: 0.0,
            protocol.RESYNC: 1.0,
        }
    )
    content = RecordDict({protocol.ARRAYS: zeros, protocol.METRICS: metrics})
    return Message(content=content, reply_to=msg)
