"""The compose federation, for real: a SuperLink container, the experimenter, honest and
attacker SuperNodes, each in its own container with its own volume; then the faults a real
deployment meets (a participant killed, frozen, cut off; the SuperLink restarted), and the
Ensembler's server and client containers. Every test ends with nothing left running."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from compose_helpers import (
    DATA,
    env_for,
    metrics_of,
    preset_text,
    run_folder,
    runs_dir,
    wait_for_round,
)

pytestmark = pytest.mark.containers


def test_compose_runs_the_federation_and_the_report_lands_on_the_host(
    fedleak_image: Any, compose: Any, tmp_path: Path
) -> None:
    """SuperLink + 2 honest + 1 attacker, 3 rounds of smoke (the collaborative protocol gives
    each participant one turn); the experimenter's exit code is compose's."""
    runs = runs_dir(tmp_path)
    env = env_for(runs, FEDLEAK_PRESET="smoke", FEDLEAK_HONEST="2", FEDLEAK_SET="run.rounds=3")
    project = compose("docker-compose.yml", env=env)
    result = project.run(
        "up", "--no-build", "--scale", "honest=2", "--exit-code-from", "experimenter", timeout=900
    )
    assert result.returncode == 0, result.stdout[-4000:]
    folder = run_folder(runs)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["remote"] == "superlink:9093"
    assert sorted(p["participant"] for p in meta["participation"]) == [0, 1, 2]
    metrics = metrics_of(folder)
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert all(math.isfinite(m["test_accuracy"]) for m in metrics)
    attack = [json.loads(x) for x in (folder / "attack.jsonl").read_text().splitlines()]
    assert any(a["variant"] == "active" and not a.get("error") for a in attack)
    assert (folder / "report.html").stat().st_size > 10_000
    # The roles sent their results through the collector, into the experimenter's inbox.
    inbox = [p.name for p in (folder / "inbox").glob("*.npz")]
    assert any("-samples-" in name for name in inbox)
    assert sum("-server-round-" in name for name in inbox) == 4


def test_faults_a_killed_a_frozen_and_a_cut_off_participant(
    fedleak_image: Any, compose: Any, docker_client: Any, tmp_path: Path
) -> None:
    """Three honest participants and the attacker on FedAvg: after round 1 one honest container
    is killed, one paused past the round timeout, one disconnected from the network; the run
    finishes with the others and says who stopped taking part."""
    runs = runs_dir(tmp_path)
    settings = "run.rounds=5"
    env = env_for(runs, FEDLEAK_PRESET="smoke", FEDLEAK_HONEST="3", FEDLEAK_SET=settings)
    project = compose("docker-compose.yml", env=env)
    extra = [
        "run.protocol=fedavg",
        "run.round-timeout=60.0",
        "run.startup-timeout=120.0",
        "eval.model-inversion=false",
    ]
    # FEDLEAK_SET takes one setting; the others go through a preset file on the runs volume.
    preset = runs / "faults.toml"
    preset.write_text(preset_text(extra))
    preset.chmod(0o644)
    project.env["FEDLEAK_PRESET"] = "/runs/faults.toml"
    project.start("--scale", "honest=3")
    wait_for_round(runs, 1)
    honest = sorted(
        docker_client.containers.list(filters=project._filter("honest")), key=lambda c: c.name
    )
    assert len(honest) == 3
    killed, paused, cut = honest
    killed.kill()
    paused.pause()
    network = next(iter(cut.attrs["NetworkSettings"]["Networks"]))
    docker_client.networks.get(network).disconnect(cut)
    time.sleep(80)  # longer than the round timeout
    paused.unpause()
    docker_client.networks.get(network).connect(cut, aliases=["honest"])
    code = project.wait("experimenter", timeout=1500)
    folder = run_folder(runs)
    meta = json.loads((folder / "meta.json").read_text())
    metrics = metrics_of(folder)
    assert metrics[-1]["round"] == 5, "the run did not go on with the others"
    assert all(math.isfinite(m["test_accuracy"]) for m in metrics)
    assert any(m["participants"] < 4 for m in metrics[1:]), "no round noticed the faults"
    # A clear status: degraded with the participants that stopped, or finished if all returned.
    assert meta["status"] in ("finished", "degraded"), meta
    if meta["status"] == "degraded":
        assert "stopped replying" in meta["message"]
    assert code == (0 if meta["status"] == "finished" else 3)
    assert (folder / "report.html").exists()


def test_a_restarted_superlink_ends_the_run_with_a_clear_status(
    fedleak_image: Any, compose: Any, tmp_path: Path
) -> None:
    """The SuperLink persists its state (--database) and is restarted mid-run. Flower does not
    bring the ServerApp back, so the run must end failed, saying why, with every round reported
    before the restart kept."""
    runs = runs_dir(tmp_path)
    override = tmp_path / "database.yml"
    override.write_text(
        "services:\n  superlink:\n    command: [fedleak, superlink, --port, '9093', "
        "--database, /state/superlink.db]\n    volumes: [superlink-state:/state]\n"
        "volumes:\n  superlink-state:\n"
    )
    preset = runs / "restart.toml"
    preset.write_text(
        preset_text(["run.rounds=20", "run.round-timeout=20.0", "run.startup-timeout=40.0"])
    )
    preset.chmod(0o644)
    env = env_for(runs, FEDLEAK_PRESET="/runs/restart.toml")
    project = compose("docker-compose.yml", override, env=env)
    project.start()
    folder = wait_for_round(runs, 2)
    before = metrics_of(folder)
    project.container("superlink").restart(timeout=5)
    code = project.wait("experimenter", timeout=900)
    meta = json.loads((folder / "meta.json").read_text())
    # Which of three ways it ends depends on timing: the ServerApp, stopped with its SuperLink,
    # says so while it can; or the restarted SuperLink marks the run failed; or the experimenter
    # notices the silence and calls the run stalled. Each says what happened.
    assert meta["status"] == "failed", meta
    assert any(
        why in meta["message"]
        for why in ("stopped by a signal", "ServerApp ended without finishing", "stalled")
    ), meta
    assert code == 1
    after = metrics_of(folder)
    assert after[: len(before)] == before  # nothing already written was lost
    assert (folder / "report.html").exists()


def test_stopping_the_compose_project_mid_run_leaves_a_readable_run_folder(
    fedleak_image: Any, compose: Any, tmp_path: Path
) -> None:
    """`docker compose stop` (or Ctrl-C on `compose up`) mid-run: the experimenter gets SIGTERM,
    records the run as stopped and writes the report from what it has."""
    runs = runs_dir(tmp_path)
    env = env_for(runs, FEDLEAK_PRESET="smoke", FEDLEAK_SET="run.rounds=20")
    project = compose("docker-compose.yml", env=env)
    project.start()
    folder = wait_for_round(runs, 1)
    result = project.run("stop", "--timeout", "30", timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]
    assert project.wait("experimenter", timeout=60) == 143
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "stopped" and meta["message"] == "stopped by SIGTERM", meta
    assert metrics_of(folder)[1]["round"] == 1
    assert "stopped" in (folder / "report.html").read_text()


def test_ensembler_server_and_client_containers(
    fedleak_image: Any, compose: Any, docker_client: Any, tmp_path: Path
) -> None:
    """The trainer, the gRPC server, the classifying client and the adversarial server's attack,
    each its own container; the client's remote predictions equal the local ones."""
    import torch

    from fedleak.ensembler.data import load_splits
    from fedleak.models.ensembler import load_client_bundle, load_server_bundle
    from fedleak.settings import load_ensembler

    runs = runs_dir(tmp_path)
    env = env_for(runs)
    override = tmp_path / "logits.yml"
    override.write_text(
        "services:\n  ensembler-client:\n    command: [fedleak, ensembler, classify, "
        "ensembler-cifar10-smoke, --bundle, /client/client.pt, --server, "
        "'ensembler-server:50051', --save-logits, /runs/remote-logits.pt]\n"
        "    volumes: ['${FEDLEAK_RUNS}:/runs']\n"
    )
    project = compose("docker-compose.yml", override, env=env)
    result = project.run("--profile", "ensembler", "run", "--rm", "ensembler-attack", timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "SSIM" in result.stdout  # the attack scored its reconstructions
    remote = torch.load(runs / "remote-logits.pt", weights_only=True)
    # The same computation locally, with the bundles the containers used.
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    for service, name in (("ensembler-server", "server.pt"), ("ensembler-client", "client.pt")):
        stream, _ = project.container(service).get_archive(f"/{service.split('-')[1]}/{name}")
        (bundles / f"{name}.tar").write_bytes(b"".join(stream))
        import tarfile

        with tarfile.open(bundles / f"{name}.tar") as tar:
            tar.extractall(bundles, filter="data")
    settings = load_ensembler("ensembler-cifar10-smoke", [f'data.root="{DATA}"'])
    victims = load_splits(settings).victims
    client = load_client_bundle(bundles / "client.pt")
    nets = load_server_bundle(bundles / "server.pt").nets
    with torch.no_grad():
        features = client.encode(victims.images)
        outputs = torch.stack([n(features) for n in nets])
        local = client.decode(outputs)
    assert remote.shape == local.shape
    assert torch.allclose(remote, local, atol=1e-4), (remote - local).abs().max()
