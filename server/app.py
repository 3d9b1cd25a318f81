"""The ServerApp: builds the strategy the run's settings name, runs it on Flower's loop, and
reports every round's global model and its own status to the experimenter.

The server holds no test data: evaluating the global model is the experimenter's measurement
(``fedleak.federation``), so the ServerApp only reports what it aggregated.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from fedleak.models import build_classifier
from fedleak.records import RoundReport, StatusReport
from fedleak.reporting import Reporter, server_reporter
from fedleak.roles import SERVER_WRAPPERS, resolve
from fedleak.server.fleet import Fleet
from fedleak.server.strategies import CollaborativeStrategy, FleetStrategy, RobustFedAvg
from fedleak.settings import FederationSettings
from fedleak.settings.flower import from_run_config

app = ServerApp()


def build_strategy(settings: FederationSettings) -> FleetStrategy:
    run = settings.run
    fleet = Fleet(settings.num_participants, run.startup_timeout, run.round_timeout)
    if run.protocol == "collaborative":
        return CollaborativeStrategy(fleet, settings)
    return RobustFedAvg(fleet, settings)


def wrap_strategy(
    strategy: FleetStrategy,
    settings: FederationSettings,
    model: torch.nn.Module,
    reporter: Reporter,
) -> Strategy:
    """Behaviour added by composition: Flower's central DP, then the curious server outermost
    (it sees the raw individual updates, whatever the server does with them afterwards)."""
    wrapped: Strategy = strategy
    defense = settings.defense
    if defense.server_dp_noise > 0:
        wrapped = DifferentialPrivacyServerSideFixedClipping(
            wrapped,
            noise_multiplier=defense.server_dp_noise,
            clipping_norm=defense.server_dp_clip,
            num_sampled_clients=settings.num_participants,
        )
    if settings.server.curious:
        wrapper = resolve(SERVER_WRAPPERS["curious"])
        wrapped = wrapper(wrapped, model, settings, reporter)
    return wrapped


class RoundReporter:
    """Flower's ``evaluate_fn``: called with the initial model (round 0) and after every round;
    sends the global model and the strategy's bookkeeping to the experimenter."""

    def __init__(self, strategy: FleetStrategy, reporter: Reporter) -> None:
        self.strategy = strategy
        self.reporter = reporter
        self.started = time.monotonic()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = {k: np.asarray(v.numpy()) for k, v in arrays.items()}
        book = self.strategy.last_round if server_round > 0 else {}
        report = RoundReport(
            round=server_round,
            arrays=state,
            sent=int(book.get("sent", 0)),
            replied=list(book.get("replied", [])),
            aggregated=list(book.get("aggregated", [])),
            rejected=list(book.get("rejected", [])),
            clipped=list(book.get("clipped", [])),
            train=dict(book.get("train", {})),
            model_finite=bool(book.get("model_finite", True)),
            elapsed=round(time.monotonic() - self.started, 2),
        )
        self.reporter.send(report)
        return MetricRecord({"aggregated": len(report.aggregated)})


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = from_run_config(context.run_config)
    reporter = server_reporter(settings, context.run_id)
    reporter.send(StatusReport(state="running"))
    try:
        torch.manual_seed(settings.run.seed)
        model = build_classifier(settings.model.name, settings.model.num_classes)
        strategy = build_strategy(settings)
        wrap_strategy(strategy, settings, model, reporter).start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=settings.run.rounds,
            timeout=settings.run.round_timeout,
            evaluate_fn=RoundReporter(strategy, reporter),
        )
    except KeyboardInterrupt:  # Flower stops its ServerApp with a signal
        message = "the ServerApp was stopped by a signal (its SuperLink stopped or restarted?)"
        reporter.send(StatusReport(state="failed", message=message))
        raise
    except BaseException as err:
        reporter.send(StatusReport(state="failed", message=f"{type(err).__name__}: {err}"))
        raise
    reporter.send(StatusReport(state="finished"))
