"""End to end over real processes: flower-superlink, flower-supernode, flwr run."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import threading
import time

import pytest

from fedleak.config import load_preset
from fedleak.launcher import launch
from fedleak.processes import tagged_pids
from fedleak.runfolder import RunFolder

pytestmark = pytest.mark.integration


def smoke(tmp_path, *overrides: str) -> dict:
    return load_preset(
        "smoke",
        [f'run.out-dir="{tmp_path}"', "eval.mi-steps=5", "attack.num-samples=20", *overrides],
    )


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "ray::" in line and not line.startswith("Z")]


def flower_processes(port: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [
        line
        for line in out.splitlines()
        if "flower-" in line and str(port) in line and "ps -eo" not in line
    ]


def test_deployment_engine_two_rounds_honest_and_attacker(tmp_path):
    report = launch(smoke(tmp_path, "run.engine=deployment", "run.rounds=2"), out=io.StringIO())
    run = RunFolder(report.parent)
    meta = run.read_json("meta.json")
    assert meta["status"] == "finished", meta.get("message")
    assert meta["versions"]["flwr"].startswith("1.")
    # Real, separate processes: one SuperLink and a SuperNode per participant, all stopped now.
    assert set(meta["processes"]) == {"superlink", "supernode 0 (honest)", "supernode 1 (attacker)"}
    assert (run.path / "logs" / "supernode-1-attacker.log").stat().st_size > 0
    assert flower_processes(meta["superlink_port"]) == []
    assert tagged_pids(meta["process_token"]) == []

    metrics = run.read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert m["participants"] == 1 and m["rejected"] == 0
        assert finite(m["test_accuracy"]) and finite(m["train_loss"])
    attack = run.read_jsonl("attack.jsonl")
    active = [a for a in attack if a["variant"] == "active"]
    assert active, "the attacker produced no scored samples"
    for key in ("target_rate", "nn_l2_median", "nn_ssim_target", "nn_ssim_other", "diversity"):
        assert finite(active[0][key]), key
    assert any(a["variant"] == "model-inversion" for a in attack)
    assert list((run.path / "participants" / "1-attacker" / "samples").glob("round-*.pt"))
    assert (run.path / "participants" / "1-attacker" / "state" / "generator.pt").exists()
    assert list((run.path / "grids").glob("figure6-*.png"))
    config = run.read_json("config.json")
    assert config["run"]["seed"] == 0 and config["participants"][1]["role"] == "attacker"
    html = report.read_text()
    assert "finished" in html and "data:image/png;base64" in html


def test_simulation_engine_same_app(tmp_path):
    report = launch(smoke(tmp_path, "run.engine=simulation", "run.rounds=2"), out=io.StringIO())
    run = RunFolder(report.parent)
    meta = run.read_json("meta.json")
    assert meta["status"] == "finished"
    assert [m["round"] for m in run.read_jsonl("metrics.jsonl")] == [0, 1, 2]
    assert run.read_jsonl("attack.jsonl")
    assert tagged_pids(meta["process_token"]) == []  # Ray and the simulation are gone too
    assert ray_processes() == []


def test_time_budget_stops_everything(tmp_path):
    """Flower's SuperExec detaches the simulation into its own session; stopping the run at its
    budget must still end it, or it trains on and competes for the CPU."""
    cfg = smoke(tmp_path, "run.engine=simulation", "run.rounds=500", "run.max-wall-time=40.0")
    report = launch(cfg, out=io.StringIO())
    run = RunFolder(report.parent)
    meta = run.read_json("meta.json")
    assert meta["status"] == "stopped" and "max-wall-time" in meta["message"]
    assert tagged_pids(meta["process_token"]) == []
    assert ray_processes() == []
    rounds = len(run.read_jsonl("metrics.jsonl"))
    time.sleep(5)
    assert len(run.read_jsonl("metrics.jsonl")) == rounds  # nothing keeps writing


def test_killed_supernode_does_not_hang_the_launcher(tmp_path):
    cfg = smoke(tmp_path, "run.engine=deployment", "run.rounds=5", "run.round-timeout=15.0")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(report=launch(cfg, out=io.StringIO())))
    thread.start()
    run_dir = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run_dir is None:
        time.sleep(1)
        for candidate in tmp_path.glob("*-smoke"):
            if len(RunFolder(candidate).read_jsonl("metrics.jsonl")) >= 2:
                run_dir = candidate
    assert run_dir is not None, "round 1 never finished"
    victim = RunFolder(run_dir).read_json("meta.json")["processes"]["supernode 0 (honest)"]
    os.killpg(victim, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive(), "the launcher hung after a SuperNode was killed"
    run = RunFolder(result["report"].parent)
    meta = run.read_json("meta.json")
    assert meta["status"] in ("finished", "failed")
    if meta["status"] == "failed":
        assert meta["message"]
    metrics = run.read_jsonl("metrics.jsonl")
    assert metrics[-1]["round"] >= 2
    assert any(m.get("participants") == 0 for m in metrics[1:]), "no round noticed the dead node"
    assert all(finite(m["test_accuracy"]) for m in metrics)
    assert result["report"].exists()


def test_plain_flwr_run_against_an_existing_superlink(tmp_path):
    """The app is a regular Flower App: hand-started SuperLink/SuperNodes, `flwr run .`."""
    from fedleak.launcher import (
        app_dir,
        flower_env,
        flwr,
        start_superlink,
        start_supernode,
        write_connection,
    )
    from fedleak.processes import ProcessGroup, pick_ports

    run = RunFolder(tmp_path / "run")
    env = flower_env(run)
    port, p0, p1 = pick_ports(0, 3, "test")
    nodes = {
        p0: 'role="honest" classes="0-4"',
        p1: f'role="attacker" classes="5-9" target-class=0 fake-class=10 state-dir="{tmp_path}/a"',
    }
    with ProcessGroup(env) as procs:
        start_superlink(procs, port, tmp_path, simulation=False)
        for node_port, node_config in nodes.items():
            start_supernode(
                procs,
                port,
                node_port,
                node_config,
                f"node {node_port}",
                tmp_path / f"node-{node_port}.log",
            )
        write_connection(run, port)
        result = flwr(
            procs.env,
            "run",
            str(app_dir()),
            "fedleak",
            "--run-config",
            f'run.rounds=2 run.dir="{run.path}" participants="[]"',
        )
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.read_json("meta.json", {}).get("server") is None:
            time.sleep(1)
        while (
            time.monotonic() < deadline
            and run.read_json("meta.json", {}).get("server") == "running"
        ):
            time.sleep(1)
    assert run.read_json("meta.json")["server"] == "finished"
    assert [m["round"] for m in run.read_jsonl("metrics.jsonl")] == [0, 1, 2]
    assert list(
        (tmp_path / "a").glob("samples/round-*.pt")
    )  # attack settings fell back to defaults


def test_gradient_inversion_through_a_real_federation(tmp_path):
    """fedsgd-cifar on the Deployment Engine with a small budget: the adversarial client isolates
    the honest client's batch-1 FedSGD update from two global models and inverts it; the curious
    server inverts the individual update. Both reach PSNR >= 30 dB with the right label."""
    cfg = load_preset(
        "fedsgd-cifar",
        [
            f'run.out-dir="{tmp_path}"',
            "run.rounds=2",
            "attack.inversion-rounds=1",
            "server.inversion-rounds=1",
            "attack.inversion-restarts=2",
            "server.inversion-restarts=2",
            "attack.inversion-iterations=200",
            "server.inversion-iterations=200",
        ],
    )
    report = launch(cfg, out=io.StringIO())
    run = RunFolder(report.parent)
    meta = run.read_json("meta.json")
    assert meta["status"] == "finished", meta.get("message")
    assert set(meta["processes"]) == {"superlink", "supernode 0 (honest)", "supernode 1 (attacker)"}
    records = run.read_jsonl("inversion.jsonl")
    client = [r for r in records if r["threat"] == "client"]
    server = [r for r in records if r["threat"] == "server" and r.get("participant") == 0]
    assert len(client) == 1 and client[0]["isolated"] == "exact", records
    assert len(server) == 1, records
    for rec in client + server:
        assert rec["round"] == 1 and rec["batch_size"] == 1
        assert rec["psnr"] >= 30.0, rec
        assert rec["label_accuracy"] == 1.0
    assert list((run.path / "grids").glob("inversion-client-round-0001.png"))
    assert "Gradient inversion" in report.read_text()
