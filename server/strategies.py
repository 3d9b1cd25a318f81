"""Strategies: FedAvg that tolerates lost or bad clients, and the collaborative protocol of
Shokri & Shmatikov (CCS'15) that Hitaj et al. attack (one participant per round, round-robin,
partial download, sparse update upload)."""

from __future__ import annotations

from collections.abc import Iterable
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

from fedleak.clients.collaborative_mod import MASK_KEY, PROTOCOL, RESYNC
from fedleak.clients.sparse_upload import download_mask
from fedleak.server.fleet import Fleet
from fedleak.server.replies import usable_replies


def round_metrics(metrics: MetricRecord | None) -> dict[str, float]:
    """Clients' aggregated training metrics, named for metrics.jsonl."""
    if metrics is None:
        return {}
    skip = ("num-examples", "collaborative-resync")
    return {k.replace("-", "_"): float(v) for k, v in metrics.items() if k not in skip}


class FleetStrategy(FedAvg):
    """Common ground: bounded waits for nodes, screened replies, per-round bookkeeping."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        self.fleet = fleet
        self.current: ArrayRecord | None = None
        self.last_round: dict[str, Any] = {}

    def screen(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        good, rejected = usable_replies(replies, self.current)
        self.last_round = {"participants": len(good), "rejected": rejected, "sent": len(replies)}
        return good

    def record(self, metrics: MetricRecord | None) -> MetricRecord | None:
        self.last_round.update(round_metrics(metrics))
        return metrics


class RobustFedAvg(FleetStrategy):
    """FedAvg weighted by example count over the nodes still connected; bad replies dropped.

    ``protocol="fedsgd"`` tells clients to take one SGD step on one batch (FedSGD as FedAvg with
    one local step). The cohort size is declared with the config, as the protocol's metadata.
    """

    def __init__(self, fleet: Fleet, protocol: str = "fedavg") -> None:
        super().__init__(fleet)
        self.protocol = protocol

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        nodes = self.fleet.nodes(grid)
        config["server-round"] = server_round
        config["protocol"] = self.protocol
        config["cohort-size"] = len(nodes)
        record = RecordDict({"arrays": arrays, "config": config})
        return [
            Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self.screen(replies)
        if not good:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, good)
        return arrays, self.record(metrics)


class CollaborativeStrategy(FleetStrategy):
    """Participants take turns; the server applies each uploaded sparse update to the global
    model and counts how often every parameter was updated (Shokri's download criterion)."""

    def __init__(
        self, fleet: Fleet, *, theta_d: float, protocol_config: dict[str, float], seed: int
    ) -> None:
        super().__init__(fleet)
        self.theta_d = theta_d
        self.protocol_config = protocol_config
        self.rng = np.random.default_rng(seed)
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
        config["server-round"] = server_round
        config["protocol"] = PROTOCOL
        for key, value in self.protocol_config.items():
            config[key] = value
        record = RecordDict({"config": config})
        # A participant's first turn downloads everything: all start from the same model.
        if self.theta_d < 1.0 and node in self.served:
            masks = self._download_masks(arrays)
            record["arrays"] = ArrayRecord(
                {
                    k: Array(np.where(masks[k], a.numpy(), 0).astype(a.numpy().dtype))
                    for k, a in arrays.items()
                }
            )
            record[MASK_KEY] = ArrayRecord({k: Array(m) for k, m in masks.items()})
        else:
            record["arrays"] = arrays
        self.served.add(node)
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node)]

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
            return None, None
        for msg in good:
            if msg.content.metric_records["metrics"].get(RESYNC, 0.0):
                self.served.discard(msg.metadata.src_node_id)
        updated = {}
        for key, array in self.current.items():
            value = array.numpy().copy()
            for msg in good:
                delta = msg.content.array_records["arrays"][key].numpy()
                value += delta.astype(value.dtype)
                self.update_counts[key] = self.update_counts.get(key, 0) + (delta != 0)
            updated[key] = Array(value)
        metrics = self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
        return ArrayRecord(updated), self.record(metrics)
