"""End to end over real processes: flower-superlink, flower-supernode, flwr run, the collector."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import threading
import time

import pytest

from fedleak import inbox
from fedleak.federation.console import Console
from fedleak.federation.launcher import RAY_DID_NOT_START, launch
from fedleak.federation.processes import tagged_pids
from fedleak.records import RoundReport, SampleSet
from fedleak.runfolder import RunFolder
from fedleak.settings import FederationSettings, load_federation

pytestmark = pytest.mark.integration


def smoke(tmp_path, *overrides: str) -> FederationSettings:
    return load_federation(
        "smoke",
        [f'run.out-dir="{tmp_path}"', "eval.mi-steps=5", "attack.num-samples=20", *overrides],
    )


def run_quietly(settings: FederationSettings) -> RunFolder:
    report, _ = launch(settings, Console("quiet", out=io.StringIO()))
    return RunFolder(report.parent)


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "ray::" in line and not line.startswith("Z")]


def test_deployment_engine_two_rounds_honest_and_attacker(tmp_path):
    run = run_quietly(smoke(tmp_path, "run.engine=deployment", "run.rounds=2"))
    meta = run.read_json("meta.json")
    assert meta["status"] == "finished", meta.get("message")
    assert meta["versions"]["flwr"].startswith("1.")
    # Real, separate processes: one SuperLink and a SuperNode per participant, all stopped now.
    assert set(meta["processes"]) == {"superlink", "supernode 0 (honest)", "supernode 1 (attacker)"}
    assert (run.path / "logs" / "supernode-1-attacker.log").stat().st_size > 0
    assert tagged_pids(meta["process_token"]) == []

    metrics = run.read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert m["participants"] == 1 and m["rejected"] == 0
        assert finite(m["test_accuracy"]) and finite(m["train_loss"])
        assert m["victims"][0]["target"] == 0 and finite(m["victims"][0]["to_fake"])
    attack = run.read_jsonl("attack.jsonl")
    active = [a for a in attack if a["variant"] == "active"]
    assert active, "the attacker produced no scored samples"
    for key in ("target_rate", "nn_l2_median", "nn_ssim_target", "nn_ssim_other", "diversity"):
        assert finite(active[0]["measures"][key]), key
    assert any(a["variant"] == "model-inversion" for a in attack)
    # What the roles produced came through the collector into the run's inbox ...
    sent = [inbox.read(p).record() for p in inbox.entries(run.path / "inbox")]
    assert [r.round for r in sent if isinstance(r, RoundReport)] == [0, 1, 2]
    assert any(isinstance(r, SampleSet) for r in sent)
    # ... while the attacker's own state stays on its node, and nothing waited in its fallback.
    node = run.path / "participants" / "1-attacker"
    assert (node / "state" / "generator.pt").exists()
    assert not (node / "inbox").exists()
    assert [p["participant"] for p in meta["participation"]] == [0, 1]
    assert list((run.path / "grids").glob("figure6-*.png"))
    config = run.read_json("config.json")
    assert config["run"]["seed"] == 0 and config["participants"][1]["role"] == "attacker"
    html = (run.path / "report.html").read_text()
    assert "finished" in html and "data:image/png;base64" in html


def test_simulation_engine_same_app_and_a_report_about_the_attackers_class(tmp_path):
    """Setting only the attacker's target class makes the whole run about that class: the
    victim-side cost, every score, the model-inversion baseline and the report."""
    settings = smoke(
        tmp_path, "run.engine=simulation", "run.rounds=2", "participants.1.target-class=3"
    )
    run = run_quietly(settings)
    meta = run.read_json("meta.json")
    if meta["status"] == "failed" and RAY_DID_NOT_START in meta["message"]:
        # Ray's own fixed startup limits, missed on an overloaded 2-core machine, are not what
        # this test checks (the message naming them is tested below): one more try.
        run = run_quietly(settings)
        meta = run.read_json("meta.json")
    assert meta["status"] == "finished", meta.get("message")
    metrics = run.read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert {v["target"] for m in metrics for v in m["victims"]} == {3}
    attack = run.read_jsonl("attack.jsonl")
    assert {a["variant"] for a in attack} == {"active", "model-inversion"}
    assert {a["target"] for a in attack} == {3}
    html = (run.path / "report.html").read_text()
    assert "on class 3" in html and "class-3 test images" in html
    assert "class 0" not in html and "class-0" not in html
    assert tagged_pids(meta["process_token"]) == []  # Ray and the simulation are gone too
    assert ray_processes() == []


def test_time_budget_stops_everything(tmp_path):
    """Flower's SuperExec detaches the simulation into its own session; stopping the run at its
    budget must still end it, or it trains on and competes for the CPU."""
    settings = smoke(tmp_path, "run.engine=simulation", "run.rounds=500", "run.max-wall-time=40.0")
    run = run_quietly(settings)
    meta = run.read_json("meta.json")
    assert meta["status"] == "stopped" and "max-wall-time" in meta["message"]
    assert tagged_pids(meta["process_token"]) == []
    assert ray_processes() == []
    rounds = len(run.read_jsonl("metrics.jsonl"))
    time.sleep(5)
    assert len(run.read_jsonl("metrics.jsonl")) == rounds  # nothing keeps writing


def test_killed_supernode_does_not_hang_the_launcher(tmp_path):
    settings = smoke(tmp_path, "run.engine=deployment", "run.rounds=5", "run.round-timeout=15.0")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run=run_quietly(settings)))
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
    run = result["run"]
    meta = run.read_json("meta.json")
    # The run completes with the attacker, and says that the honest participant was lost.
    assert meta["status"] in ("degraded", "failed"), meta
    assert "participant 0 (honest)" in meta["message"] or meta["status"] == "failed"
    metrics = run.read_jsonl("metrics.jsonl")
    assert metrics[-1]["round"] >= 2
    assert any(m.get("participants") == 0 for m in metrics[1:]), "no round noticed the dead node"
    assert all(finite(m["test_accuracy"]) for m in metrics)
    assert (run.path / "report.html").exists()


def test_plain_flwr_run_against_an_existing_superlink(tmp_path):
    """The app is a regular Flower App: hand-started SuperLink/SuperNodes, `flwr run .`. With no
    collector, the server keeps its records on its own host and the attacker on its node."""
    from fedleak.federation.launcher import (
        app_dir,
        flower_env,
        flwr,
        start_superlink,
        start_supernode,
        write_connection,
    )
    from fedleak.federation.processes import ProcessGroup, pick_ports

    run = RunFolder(tmp_path / "run")
    env = flower_env(run)
    port, p0, p1 = pick_ports(0, 3, "test")
    nodes = {
        p0: 'index=0 role="honest" classes="0-4"',
        p1: f'index=1 role="attacker" classes="5-9" target-class=0 fake-class=10 '
        f'out-dir="{tmp_path}/a"',
    }
    server_inbox = tmp_path / "server-runs"
    with ProcessGroup(env) as procs:
        start_superlink(procs, port, tmp_path, simulation=False, env={})
        for node_port, node_config in nodes.items():
            log = tmp_path / f"node-{node_port}.log"
            start_supernode(procs, port, node_port, node_config, f"node {node_port}", log, env={})
        write_connection(run, f"127.0.0.1:{port}")
        result = flwr(
            procs.env,
            "run",
            str(app_dir()),
            "fedleak",
            "--run-config",
            f'run.rounds=2 run.out-dir="{server_inbox}" participants="[]"',
        )
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            kinds = [inbox.read(p).kind for p in server_inbox.glob("*/inbox/*.npz")]
            if "status" in kinds and kinds.count("round") >= 3:
                break
            time.sleep(1)
    records = [inbox.read(p).record() for p in sorted(server_inbox.glob("*/inbox/*.npz"))]
    assert [r.round for r in records if isinstance(r, RoundReport)] == [0, 1, 2]
    assert [r.state for r in records if r.kind == "status"][-1] == "finished"
    # The attacker's samples stayed on its node (attack settings fell back to the defaults).
    kept = [inbox.read(p).record() for p in inbox.entries(tmp_path / "a" / "inbox")]
    assert any(isinstance(r, SampleSet) for r in kept)


def test_a_known_outside_failure_is_named_from_the_serverapp_log(tmp_path):
    """Ray's fixed 30-s startup limit, missed on an overloaded machine, surfaces in Flower only
    as exit code 700 deep in the ServerApp's log; the run's message says what it was."""
    from fedleak.federation.launcher import known_cause

    log = tmp_path / "serverapp.log"
    assert known_cause(log) is None  # no log at all
    log.write_text("INFO: round 1\nERROR: something else\n")
    assert known_cause(log) is None
    log.write_text(
        "ERROR: An exception occured!! The current node timed out during startup. This could "
        "happen because some of the raylet failed to startup or the GCS has become overloaded.\n"
    )
    cause = known_cause(log)
    assert cause is not None and "Ray (Flower's Simulation Engine) did not start" in cause
    assert 'run.engine = "deployment"' in cause
    log.write_text("RuntimeError: Timed out waiting for file /tmp/ray/s/gcs_server_port_ad4d\n")
    assert known_cause(log) == cause


def test_a_participant_killed_before_its_first_turn_is_reported_lost(tmp_path):
    """Under sampling a participant may be killed before it is ever picked: it announced itself,
    never replied, and the rounds it was sent got no reply. The run must not end `finished`."""
    from fedleak.federation.scoring import Scoring
    from fedleak.records import NodeReport
    from fedleak.runfolder import RunFolder
    from fedleak.settings import load_federation

    scoring = Scoring(RunFolder(tmp_path / "run"), load_federation("smoke"))
    h = scoring.health
    h.nodes = {11: NodeReport(participant=0, node=11), 22: NodeReport(1, 22, role="attacker")}
    h.replied[22] += [1, 3, 5]
    h.last_round = 5
    assert scoring.lost_participants() == []  # no round went unanswered: it was never picked
    h.empty_rounds += [2, 4]
    assert scoring.lost_participants() == [
        "participant 0 (honest) never replied (round(s) 2, 4 got no reply)"
    ]
