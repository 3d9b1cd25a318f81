"""Every training reply is checked against what the server declared before it can reach
aggregation. A participant may lie, so nothing it declares is trusted:

- exactly the records the protocol has (``arrays`` and ``metrics``), no client error;
- the global model's parameter names, shapes and dtypes (an int64, bool or float64 array is
  refused, not cast), every value finite in the model's dtype;
- ``num-examples`` a positive, finite, whole number: exactly the count the round's instructions
  fix (fedsgd, fedavg with examples-per-round), else at most ``server.max-examples``;
- optionally, an update norm bound (``server.update-norm-bound``): a larger update is scaled down
  to it, and the round reports that it clipped.

A refused reply is logged with the node and the reason and counted in the round's record; it
never reaches aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common.logger import log

from fedleak import protocol


class Refused(ValueError):
    """Why a reply cannot be used."""


@dataclass
class Screening:
    """The outcome of checking one round's replies."""

    accepted: list[Message] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"node", "reason"}
    clipped: list[int] = field(default_factory=list)

    @property
    def replied(self) -> list[int]:
        return sorted(
            [int(m.metadata.src_node_id) for m in self.accepted]
            + [int(r["node"]) for r in self.rejected]
        )


@dataclass(frozen=True)
class ReplyCheck:
    """What a reply must satisfy this round."""

    reference: ArrayRecord  # the model the server sent (names, shapes, dtypes)
    examples: int | None  # the exact count the instructions fix, else None
    max_examples: int
    norm_bound: float = 0.0  # 0 = no bound
    update_is_delta: bool = False  # collaborative: the reply is the update itself

    def screen(self, replies: Iterable[Message]) -> Screening:
        out = Screening()
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            try:
                if self._check(msg):
                    out.clipped.append(node)
                out.accepted.append(msg)
            except Refused as why:
                out.rejected.append({"node": node, "reason": str(why)})
                log(WARNING, "Rejected reply from node %s: %s", node, why)
        return out

    def _check(self, msg: Message) -> bool:
        """Raise Refused, or return whether the update was clipped to the norm bound."""
        if msg.has_error():
            raise Refused(f"client error: {msg.error.reason}")
        content = msg.content
        arrays = content.array_records.get(protocol.ARRAYS)
        metrics = content.metric_records.get(protocol.METRICS)
        if arrays is None or metrics is None:
            raise Refused(f"a reply needs '{protocol.ARRAYS}' and '{protocol.METRICS}' records")
        extra = (
            set(content.array_records) - {protocol.ARRAYS}
            | set(content.metric_records) - {protocol.METRICS}
            | set(content.config_records)
        )
        if extra:
            raise Refused(f"unexpected records {sorted(extra)}")
        self._check_examples(metrics.get(protocol.NUM_EXAMPLES))
        updates = self._check_arrays(arrays)
        return self._bound(arrays, updates)

    def _check_examples(self, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Refused(f"'{protocol.NUM_EXAMPLES}' is missing or not a number: {value!r}")
        if not math.isfinite(value) or value != int(value) or value < 1:
            raise Refused(f"'{protocol.NUM_EXAMPLES}' must be a whole number >= 1, got {value!r}")
        if self.examples is not None and value != self.examples:
            raise Refused(
                f"'{protocol.NUM_EXAMPLES}' = {value:g}, but this round's instructions fix "
                f"{self.examples}"
            )
        if value > self.max_examples:
            raise Refused(
                f"'{protocol.NUM_EXAMPLES}' = {value:g} exceeds server.max-examples "
                f"({self.max_examples})"
            )

    def _check_arrays(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        if list(arrays.keys()) != list(self.reference.keys()):
            raise Refused("parameter names differ from the global model's")
        updates = {}
        for key, ref in self.reference.items():
            got, want = arrays[key], ref.numpy()
            if tuple(got.shape) != tuple(want.shape):
                raise Refused(f"'{key}' has shape {tuple(got.shape)}, expected {want.shape}")
            value = got.numpy()
            if value.dtype != want.dtype:
                raise Refused(f"'{key}' has dtype {value.dtype}, expected {want.dtype}")
            if np.issubdtype(want.dtype, np.floating) and not np.all(np.isfinite(value)):
                raise Refused(f"'{key}' contains NaN or inf")
            updates[key] = value if self.update_is_delta else value - want
        return updates

    def _bound(self, arrays: ArrayRecord, updates: dict[str, np.ndarray]) -> bool:
        if self.norm_bound <= 0:
            return False
        norm = math.sqrt(sum(float(np.square(u, dtype=np.float64).sum()) for u in updates.values()))
        if not math.isfinite(norm):
            raise Refused("the update's norm is not finite")
        if norm <= self.norm_bound:
            return False
        scale = self.norm_bound / norm
        for key, ref in self.reference.items():
            base = np.zeros_like(ref.numpy()) if self.update_is_delta else ref.numpy()
            clipped = (base + updates[key] * scale).astype(ref.numpy().dtype)
            arrays[key] = Array(np.ascontiguousarray(clipped))
        return True


def finite(arrays: ArrayRecord) -> bool:
    return all(
        np.all(np.isfinite(a.numpy()))
        for a in arrays.values()
        if np.issubdtype(a.numpy().dtype, np.floating)
    )
