"""The prototype compose file: a real SuperLink, two SuperNodes and a submitter in containers."""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedleak.config import load_preset, participant_spec, to_node_config

COMPOSE = "deploy/prototype-compose.yml"
REPO = Path(__file__).resolve().parents[2]
RUNTIME_KEYS = ("out-dir", "state-dir")  # set per deployment, as the launcher's prepare() does


def _pairs(node_config: str) -> dict[str, str]:
    """`k=v k2="v 2"` -> {k: v, k2: '"v 2"'} (values kept as TOML text)."""
    return dict(item.split("=", 1) for item in shlex.split(node_config, posix=False))


def _node_config(service: dict[str, Any]) -> dict[str, str]:
    command = service["command"]
    return _pairs(command[command.index("--node-config") + 1])


def test_node_configs_are_the_smoke_presets_participants() -> None:
    """The compose file spells out what `fedleak run smoke` gives each SuperNode; it must not
    drift from the preset (this runs without Docker)."""
    services = yaml.safe_load((REPO / COMPOSE).read_text())["services"]
    cfg = load_preset("smoke", ["run.engine=deployment"])
    for i in range(len(cfg["participants"])):
        expected = _pairs(to_node_config(participant_spec(cfg, i) | {"index": i}))
        got = _node_config(services[f"node-{i}"])
        assert {k: v for k, v in got.items() if k not in RUNTIME_KEYS} == expected
        assert set(RUNTIME_KEYS) <= set(got)


def _read_from_container(container: Any, path: str) -> dict[str, bytes]:
    """Files under `path` in a (possibly stopped) container: {relative name: content}."""
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def _prototype(compose: Any, image: Any, data: Path, tmp_path: Path) -> tuple[Any, Path]:
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chmod(runs, 0o777)  # the image's user (uid 1000) writes the ServerApp's run folder here
    env = {
        "FEDLEAK_IMAGE": image.tag,
        "FEDLEAK_DATA": str(data.resolve()),
        "FEDLEAK_RUNS": str(runs),
        "FEDLEAK_RUN_DIR": "/runs/prototype",
        "FEDLEAK_ROUNDS": "2",
    }
    return compose(COMPOSE, env=env), runs / "prototype"


def _up(project: Any) -> Any:
    return project.run("up", "--no-build", "--exit-code-from", "submitter", timeout=900)


@pytest.mark.containers
def test_prototype_compose_runs_two_rounds_of_smoke(
    fedleak_image: Any, compose: Any, data_root: Path, tmp_path: Path
) -> None:
    project, run_dir = _prototype(compose, fedleak_image, data_root, tmp_path)
    result = _up(project)
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    assert "finished:completed" in output

    # The ServerApp (in the SuperLink's container) wrote both rounds with finite metrics.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    rounds = [m for m in metrics if m.get("round", 0) > 0]
    assert [m["round"] for m in rounds] == [1, 2]
    for m in rounds:
        assert math.isfinite(m["test_accuracy"]) and 0.0 <= m["test_accuracy"] <= 1.0
        assert m["participants"] >= 1

    # The attacker's node wrote its generator samples into its own volume, not the server's.
    files = _read_from_container(project.container("node-1"), "/runs/1-attacker")
    assert any(name.endswith(".pt") or name.endswith(".png") for name in files), sorted(files)
    assert not (run_dir.parent / "1-attacker").exists()


@pytest.mark.containers
def test_a_failed_run_fails_compose_up(fedleak_image: Any, compose: Any, tmp_path: Path) -> None:
    """The ServerApp cannot find the test set: `flwr run` itself succeeds, Flower marks the run
    failed, and that must reach `docker compose up`'s exit code."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    project, run_dir = _prototype(compose, fedleak_image, empty, tmp_path)
    result = _up(project)
    assert result.returncode == 1, result.stdout[-4000:]
    assert "finished:failed" in result.stdout
    assert "dataset file not found" in result.stdout  # the ServerApp's log, shown by the submitter
