"""A curious server: a strategy wrapper that hands every client's individual update to the
gradient-inversion attack before the wrapped strategy aggregates.

Composition, as Flower's own DP wrappers do it: ``CuriousServer(RobustFedAvg(...))`` behaves
exactly like the strategy it wraps; it only looks. Reconstructions are reported to the
experimenter, keyed by round and node; the testbed scores them against every participant's batch.
The ServerApp composes it by name (``fedleak.roles.SERVER_WRAPPERS``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedleak import protocol
from fedleak.attacker.federated_inversion import (
    Protocol,
    individual_update,
    invert,
    observation_from_update,
    update_norm,
)
from fedleak.attacker.inversion_reports import failure_report, reconstruction_report
from fedleak.data import image_shape
from fedleak.reporting import Reporter
from fedleak.settings import FederationSettings

log = logging.getLogger(__name__)


class CuriousServer(Strategy):
    def __init__(
        self,
        strategy: Strategy,
        model: torch.nn.Module,
        settings: FederationSettings,
        reporter: Reporter,
    ) -> None:
        self.strategy = strategy
        self.model = model
        self.settings = settings
        self.inversion = settings.server  # the server's InversionSettings
        self.reporter = reporter
        self.image_shape = image_shape(settings.data.dataset)
        self.sent: ArrayRecord | None = None
        self.protocol: Protocol | None = None

    def __getattr__(self, name: str) -> Any:  # the wrapped strategy's bookkeeping (last_round)
        return getattr(self.__dict__["strategy"], name)

    def summary(self) -> None:
        log.info("Curious server: inverts individual updates with %s", self.inversion.inversion)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sent = arrays
        if messages:
            declared = messages[0].content.config_records[protocol.CONFIG]
            classes = self.settings.model.num_classes
            self.protocol = Protocol.from_config(declared, classes, self.image_shape)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        due = server_round <= self.inversion.inversion_rounds
        if due and self.sent is not None and self.protocol is not None:
            for msg in replies:
                self._invert(server_round, msg)
        return self.strategy.aggregate_train(server_round, replies)

    def _invert(self, server_round: int, msg: Message) -> None:
        node = int(msg.metadata.src_node_id)
        where = {"threat": "server", "round": server_round, "node": node}
        try:
            if msg.has_error() or protocol.ARRAYS not in msg.content.array_records:
                return
            sent = msg.content.array_records[protocol.ARRAYS]
            update = individual_update(self.model, self.sent, sent)
            observation = observation_from_update(self.sent, update, self.protocol)
            inv = self.inversion
            result = invert(
                self.model,
                observation,
                inv.inversion,
                inv.inversion_iterations,
                inv.inversion_restarts,
                self.settings.run.seed,
            )
            report = reconstruction_report(result, update_norm=update_norm(update), **where)
        except Exception as err:  # a bad reply or a failed attack must not stop the federation
            log.warning("curious server: cannot invert node %s's update: %s", node, err)
            report = failure_report(err, **where)
        self.reporter.send(report)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
