"""Strategies: FedAvg that tolerates lost, stalled and lying clients, and the collaborative
protocol of Shokri & Shmatikov (CCS'15) that Hitaj et al. attack (one participant per round,
round-robin, partial download, sparse update upload).

Each round the strategy declares the training procedure (:class:`fedleak.protocol.Instructions`),
screens every reply against it (``server/replies.py``) and keeps the round's bookkeeping
(``last_round``) for the round report. A global model that would stop being finite is not
adopted, and too many rounds in a row without a usable reply end the run with that reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedleak import protocol
from fedleak.collaborative import download_mask
from fedleak.server.fleet import Fleet, FleetError
from fedleak.server.replies import ReplyCheck, finite
from fedleak.settings import FederationSettings


def round_metrics(metrics: MetricRecord | None) -> dict[str, float]:
    """Clients' aggregated training metrics, named for metrics.jsonl."""
    if metrics is None:
        return {}
    skip = (protocol.NUM_EXAMPLES, protocol.RESYNC)
    return {k.replace("-", "_"): float(v) for k, v in metrics.items() if k not in skip}


class FleetStrategy(FedAvg):
    """Common ground: bounded waits for nodes, screened replies, per-round bookkeeping."""

    def __init__(self, fleet: Fleet, settings: FederationSettings) -> None:
        super().__init__(
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_available_nodes=1,
            weighted_by_key=protocol.NUM_EXAMPLES,
        )
        self.fleet = fleet
        self.settings = settings
        self.current: ArrayRecord | None = None
        self.instructions: protocol.Instructions | None = None
        self.last_round: dict[str, Any] = {}
        self.empty_rounds = 0

    def declare(self, server_round: int, cohort_size: int) -> protocol.Instructions:
        """This round's instructions, from the run's train and protocol settings."""
        train, collab = self.settings.train, self.settings.protocol
        self.instructions = protocol.Instructions(
            server_round=server_round,
            protocol=self.settings.run.protocol,
            lr=train.lr,
            lr_decay=train.lr_decay,
            momentum=train.momentum,
            batch_size=train.batch_size,
            local_batches=train.local_batches,
            examples_per_round=train.examples_per_round,
            cohort_size=cohort_size,
            theta_u=collab.theta_u,
            tau=collab.tau,
            gamma=collab.gamma,
            dp_epsilon=collab.dp_epsilon,
        )
        return self.instructions

    def screen(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        server = self.settings.server
        check = ReplyCheck(
            reference=self.current,
            examples=self.instructions.examples if self.instructions else None,
            max_examples=server.max_examples,
            norm_bound=server.update_norm_bound,
            update_is_delta=self.settings.run.protocol == "collaborative",
        )
        screening = check.screen(replies)
        self.last_round = {
            "sent": self.last_round.get("sent", len(replies)),
            "replied": screening.replied,
            "aggregated": sorted(int(m.metadata.src_node_id) for m in screening.accepted),
            "rejected": screening.rejected,
            "clipped": screening.clipped,
            "model_finite": True,
        }
        return screening.accepted

    def adopt(
        self, arrays: ArrayRecord | None, metrics: MetricRecord | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep the previous model when nothing usable came back or the aggregate is not
        finite; fail the run after ``run.max-empty-rounds`` such rounds in a row."""
        if arrays is not None and not finite(arrays):
            self.last_round["model_finite"] = False
            arrays = None
        self.last_round["train"] = round_metrics(metrics)
        self.empty_rounds = 0 if arrays is not None else self.empty_rounds + 1
        limit = self.settings.run.max_empty_rounds
        if self.empty_rounds >= limit:
            why = "no usable reply" if self.last_round["model_finite"] else "a non-finite model"
            raise FleetError(
                f"{self.empty_rounds} rounds in a row aggregated nothing ({why}; "
                f"run.max-empty-rounds = {limit})"
            )
        return arrays, metrics

    def _messages(self, record: RecordDict, nodes: list[int]) -> list[Message]:
        self.last_round = {"sent": len(nodes)}
        return [
            Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes
        ]


class RobustFedAvg(FleetStrategy):
    """FedAvg weighted by example count over the nodes still connected; bad replies dropped.

    On ``fedsgd`` clients take one SGD step on one batch (FedSGD as FedAvg with one local step).
    The cohort size is declared with the instructions, as the protocol's metadata.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        nodes = self.fleet.nodes(grid)
        declared = ConfigRecord(self.declare(server_round, len(nodes)).to_record())
        record = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: declared})
        return self._messages(record, nodes)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self.screen(replies)
        if not good:
            return self.adopt(None, None)
        return self.adopt(*super().aggregate_train(server_round, good))


class CollaborativeStrategy(FleetStrategy):
    """Participants take turns; the server applies each uploaded sparse update to the global
    model and counts how often every parameter was updated (Shokri's download criterion)."""

    def __init__(self, fleet: Fleet, settings: FederationSettings) -> None:
        super().__init__(fleet, settings)
        self.theta_d = settings.protocol.theta_d
        self.rng = np.random.default_rng(settings.run.seed)
        self.update_counts: dict[str, np.ndarray] = {}
        self.served: set[int] = set()
        self.turn = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        nodes = self.fleet.nodes(grid)
        node = nodes[self.turn % len(nodes)]
        self.turn += 1
        declared = replace(self.declare(server_round, 1), examples_per_round=0)
        record = RecordDict({protocol.CONFIG: ConfigRecord(declared.to_record())})
        # A participant's first turn downloads everything: all start from the same model.
        if self.theta_d < 1.0 and node in self.served:
            masks = self._download_masks(arrays)
            record[protocol.ARRAYS] = ArrayRecord(
                {
                    k: Array(np.where(masks[k], a.numpy(), 0).astype(a.numpy().dtype))
                    for k, a in arrays.items()
                }
            )
            record[protocol.DOWNLOAD_MASK] = ArrayRecord({k: Array(m) for k, m in masks.items()})
        else:
            record[protocol.ARRAYS] = arrays
        self.served.add(node)
        return self._messages(record, [node])

    def _download_masks(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        keys = list(arrays.keys())
        counts = [self.update_counts.get(k, np.zeros(arrays[k].shape)) for k in keys]
        flat = download_mask(np.concatenate([c.ravel() for c in counts]), self.theta_d, self.rng)
        pieces = np.split(flat, np.cumsum([c.size for c in counts])[:-1])
        return {k: p.reshape(c.shape) for k, p, c in zip(keys, pieces, counts, strict=True)}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self.screen(replies)
        if not good:
            return self.adopt(None, None)
        for msg in good:
            if msg.content.metric_records[protocol.METRICS].get(protocol.RESYNC, 0.0):
                self.served.discard(msg.metadata.src_node_id)
        updated = {}
        for key, array in self.current.items():
            value = array.numpy().copy()
            for msg in good:
                delta = msg.content.array_records[protocol.ARRAYS][key].numpy()
                value += delta.astype(value.dtype)
                self.update_counts[key] = self.update_counts.get(key, 0) + (delta != 0)
            updated[key] = Array(value)
        metrics = self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
        return self.adopt(ArrayRecord(updated), metrics)
