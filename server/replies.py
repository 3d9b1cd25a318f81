"""Reject replies that would poison the global model: errors, wrong shapes, NaN or inf."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log


def reply_problem(msg: Message, reference: ArrayRecord) -> str | None:
    """Why a training reply is unusable, or None if it is fine."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        return "no 'arrays' record"
    if list(arrays.keys()) != list(reference.keys()):
        return "parameter names differ from the global model"
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"'{key}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if not np.all(np.isfinite(got.numpy())):
            return f"'{key}' contains NaN or inf"
    metrics = msg.content.metric_records.get("metrics")
    if metrics is None or "num-examples" not in metrics:
        return "no 'metrics' record with 'num-examples'"
    return None


def usable_replies(replies: Iterable[Message], reference: ArrayRecord) -> tuple[list[Message], int]:
    good, rejected = [], 0
    for msg in replies:
        problem = reply_problem(msg, reference)
        if problem is None:
            good.append(msg)
        else:
            rejected += 1
            log(WARNING, "Rejected reply from node %s: %s", msg.metadata.src_node_id, problem)
    return good, rejected
