"""The ServerApp: builds the strategy the run config names and runs it on Flower's loop."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from fedleak.config import from_run_config
from fedleak.data import image_shape
from fedleak.models import build_classifier
from fedleak.runfolder import SERVER_ATTACK_DIR, RunFolder
from fedleak.server.curious import CuriousServer
from fedleak.server.evaluation import CentralEvaluation
from fedleak.server.fleet import Fleet
from fedleak.server.strategies import CollaborativeStrategy, FleetStrategy, RobustFedAvg

app = ServerApp()


def build_strategy(cfg: dict[str, Any]) -> FleetStrategy:
    run = cfg["run"]
    fleet = Fleet(cfg["num-participants"], run["startup-timeout"], run["round-timeout"])
    if run["protocol"] in ("fedavg", "fedsgd"):
        return RobustFedAvg(fleet, protocol=run["protocol"])
    proto = cfg["protocol"]
    shared = {k: float(proto[k]) for k in ("theta-u", "tau", "gamma", "dp-epsilon")}
    return CollaborativeStrategy(
        fleet, theta_d=proto["theta-d"], protocol_config=shared, seed=run["seed"]
    )


def wrap_strategy(
    strategy: FleetStrategy, cfg: dict[str, Any], model: torch.nn.Module, run: RunFolder
) -> Strategy:
    """Behaviour added by composition: Flower's central DP, then the curious server outermost
    (it sees the raw individual updates, whatever the server does with them afterwards)."""
    wrapped: Strategy = strategy
    defense = cfg["defense"]
    if defense["server-dp-noise"] > 0:
        wrapped = DifferentialPrivacyServerSideFixedClipping(
            wrapped,
            noise_multiplier=defense["server-dp-noise"],
            clipping_norm=defense["server-dp-clip"],
            num_sampled_clients=cfg["num-participants"],
        )
    server = cfg["server"]
    if server["curious"]:
        wrapped = CuriousServer(
            wrapped,
            model,
            run.path / SERVER_ATTACK_DIR,
            attack=server["inversion"],
            num_classes=cfg["model"]["num-classes"],
            image_shape=image_shape(cfg["data"]["dataset"]),
            iterations=server["inversion-iterations"],
            restarts=server["inversion-restarts"],
            rounds=server["inversion-rounds"],
            seed=int(cfg["run"]["seed"]),
        )
    return wrapped


def train_config(cfg: dict[str, Any]) -> ConfigRecord:
    """What every participant is told each round (the agreed training procedure)."""
    train = cfg["train"]
    return ConfigRecord(
        {
            "lr": float(train["lr"]),
            "lr-decay": float(train["lr-decay"]),
            "momentum": float(train["momentum"]),
            "batch-size": int(train["batch-size"]),
            "local-batches": int(train["local-batches"]),
            "examples-per-round": int(train["examples-per-round"]),
        }
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_run_config(context.run_config)
    run = (
        RunFolder(cfg["run"]["dir"])
        if cfg["run"]["dir"]
        else RunFolder.create(cfg["run"]["out-dir"], f"flwr-{context.run_id}")
    )
    run.write_meta(server="running")
    torch.manual_seed(cfg["run"]["seed"])
    model = build_classifier(cfg["model"]["name"], cfg["model"]["num-classes"])
    strategy = build_strategy(cfg)
    evaluation = CentralEvaluation(cfg, run, strategy)
    try:
        wrap_strategy(strategy, cfg, model, run).start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=cfg["run"]["rounds"],
            timeout=cfg["run"]["round-timeout"],
            train_config=train_config(cfg),
            evaluate_fn=evaluation,
        )
    except Exception as err:
        run.write_meta(server="failed", server_error=f"{type(err).__name__}: {err}")
        raise
    run.write_meta(server="finished")
