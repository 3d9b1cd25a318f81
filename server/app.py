"""The ServerApp: builds the strategy the run config names and runs it on Flower's loop."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedleak.config import from_run_config
from fedleak.models import build_classifier
from fedleak.runfolder import RunFolder
from server.evaluation import CentralEvaluation
from server.fleet import Fleet
from server.strategies import CollaborativeStrategy, RobustFedAvg

app = ServerApp()


def build_strategy(cfg: dict[str, Any]) -> FedAvg:
    run = cfg["run"]
    fleet = Fleet(cfg["num-participants"], run["startup-timeout"], run["round-timeout"])
    if run["protocol"] == "fedavg":
        return RobustFedAvg(fleet)
    proto = cfg["protocol"]
    shared = {k: float(proto[k]) for k in ("theta-u", "tau", "gamma", "dp-epsilon")}
    return CollaborativeStrategy(
        fleet, theta_d=proto["theta-d"], protocol_config=shared, seed=run["seed"]
    )


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
        strategy.start(
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
