"""A curious server: a strategy wrapper that hands every client's individual update to the
gradient-inversion attack before the wrapped strategy aggregates.

Composition, as Flower's own DP wrappers do it: ``CuriousServer(RobustFedAvg(...))`` behaves
exactly like the strategy it wraps; it only looks. Reconstructions go to the server's attack
folder, keyed by round and node; the testbed scores them against every participant's batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedleak.attacker.federated_inversion import (
    Protocol,
    individual_update,
    invert,
    observation_from_update,
    save_reconstruction,
    update_norm,
)

log = logging.getLogger(__name__)


class CuriousServer(Strategy):
    def __init__(
        self,
        strategy: Strategy,
        model: torch.nn.Module,
        out_dir: str | Path,
        *,
        attack: str,
        num_classes: int,
        image_shape: tuple[int, int, int],
        iterations: int = 0,
        restarts: int = 0,
        rounds: int = 1,
        seed: int = 0,
    ) -> None:
        self.strategy = strategy
        self.model = model
        self.out_dir = Path(out_dir)
        self.attack = attack
        self.num_classes = num_classes
        self.image_shape = image_shape
        self.iterations = iterations
        self.restarts = restarts
        self.rounds = rounds
        self.seed = seed
        self.sent: ArrayRecord | None = None
        self.protocol: Protocol | None = None

    def __getattr__(self, name: str) -> Any:  # the wrapped strategy's bookkeeping (last_round)
        return getattr(self.__dict__["strategy"], name)

    def summary(self) -> None:
        log.info("Curious server: inverts individual updates with %s", self.attack)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sent = arrays
        if messages:
            declared = messages[0].content.config_records["config"]
            self.protocol = Protocol.from_config(declared, self.num_classes, self.image_shape)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if server_round <= self.rounds and self.sent is not None and self.protocol is not None:
            for msg in replies:
                self._invert(server_round, msg)
        return self.strategy.aggregate_train(server_round, replies)

    def _invert(self, server_round: int, msg: Message) -> None:
        node = msg.metadata.src_node_id
        name = f"round-{server_round:04d}-node-{node}"
        try:
            if msg.has_error() or "arrays" not in msg.content.array_records:
                return
            update = individual_update(self.model, self.sent, msg.content.array_records["arrays"])
            observation = observation_from_update(self.sent, update, self.protocol)
            record = invert(
                self.model, observation, self.attack, self.iterations, self.restarts, self.seed
            )
            record.update(
                round=server_round, threat="server", node=int(node), update_norm=update_norm(update)
            )
        except Exception as err:  # a bad reply or a failed attack must not stop the federation
            log.warning("curious server: cannot invert node %s's update: %s", node, err)
            record = {
                "round": server_round,
                "threat": "server",
                "node": int(node),
                "error": f"{type(err).__name__}: {err}",
            }
        save_reconstruction(self.out_dir, name, record)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
