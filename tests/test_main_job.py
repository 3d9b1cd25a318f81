"""README command 1, as a user runs it: `fedleak run` (the demo preset) ends with a visible leak,
a verdict line per attack in the terminal and the private vs reconstructed grid in the report.
Two rounds instead of three (one inversion per threat) to keep the suite short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def test_the_main_job_reconstructs_private_images_and_says_so(tmp_path):
    cmd = [sys.executable, "-m", "fedleak.cli", "run", "--set", f'run.out-dir="{tmp_path}"']
    cmd += ["--set", "run.rounds=2"]
    cmd += ["--set", "attack.inversion-rounds=1", "--set", "server.inversion-rounds=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    # The story, from the first second: what starts, each result as it arrives, the verdict.
    assert "SuperLink listening" in out and "2 SuperNodes started" in out
    assert "inversion of participant 0's update by the adversarial client, round 1: PSNR" in out
    assert "inversion of participant 0's update by the curious server, round 1: PSNR" in out
    verdicts = [line for line in out.splitlines() if "reconstructed" in line]
    assert any(v.startswith("fedleak: Adversarial client: reconstructed 1/1") for v in verdicts)
    assert any(v.startswith("fedleak: Curious server: reconstructed 2/2") for v in verdicts)
    (folder,) = [p for p in tmp_path.iterdir() if (p / "meta.json").exists()]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["seed"] is not None
    assert meta["versions"]["torch"] and meta["versions"]["flwr"]
    assert all(p["device"] for p in meta["participation"])  # which device each role used
    assert set(meta["processes"]) == {"superlink", "supernode 0 (honest)", "supernode 1 (attacker)"}
    records = [json.loads(x) for x in (folder / "inversion.jsonl").read_text().splitlines()]
    client = [r for r in records if r.get("threat") == "client"]
    server = [r for r in records if r.get("threat") == "server" and r.get("participant") == 0]
    assert len(client) == 1 and client[0]["isolated"] == "exact", records
    assert len(server) == 1, records
    for rec in client + server:
        assert rec["round"] == 1 and rec["batch_size"] == 1
        assert rec["psnr"] >= 30.0 and rec["label_accuracy"] == 1.0, rec
    assert (folder / "grids" / "inversion-client-round-0001.png").exists()
    html = (folder / "report.html").read_text()
    assert "Private (top) and reconstructed (bottom) images" in html
    assert html.index("reconstructed 1/1") < html.index("Gradient inversion")  # verdict first
