"""What the compose tests share: a host folder for run folders, the environment compose gets,
reading back the experimenter's run folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("FEDLEAK_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


def runs_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the containers' user (uid 1000) writes the run folder
    return runs


def env_for(runs: Path, **extra: str) -> dict[str, str]:
    return {
        "FEDLEAK_DATA": str(DATA),
        "FEDLEAK_RUNS": str(runs),
        "FEDLEAK_REPORT_TOKEN": "container-test-token",
        **extra,
    }


def run_folder(runs: Path) -> Path:
    (folder,) = [p for p in runs.iterdir() if p.is_dir() and (p / "meta.json").exists()]
    return folder


def metrics_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def wait_for_round(runs: Path, round_: int, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in runs.glob("*/metrics.jsonl"):
            if any(m["round"] >= round_ for m in metrics_of(folder.parent)):
                return folder.parent
        time.sleep(2)
    raise AssertionError(f"round {round_} never finished")


def preset_text(extra: list[str]) -> str:
    """The smoke preset with these settings, as a TOML preset file."""
    from fedleak.settings import dump_toml, load_federation

    settings = load_federation("smoke", extra)
    return dump_toml(settings)
