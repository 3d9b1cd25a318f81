"""The smoke preset end to end: real server processes, gRPC, recordings, attack, run folder."""

from __future__ import annotations

import json

import pytest

from fedleak import cli
from fedleak.report.ensembler import PAPER_TABLE1

pytestmark = pytest.mark.integration


def test_smoke_preset_through_real_server_processes(data_root, tmp_path, capsys):
    code = cli.main(
        [
            "ensembler",
            "run",
            "ensembler-cifar10-smoke",
            "--set",
            f"out-dir={tmp_path}",
            "--set",
            f"data.root={data_root}",
        ]
    )
    assert code == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["seed"] == 0 and meta["versions"]["torch"]
    results = json.loads((run / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == [
        "NONE",
        "Shredder",
        "Single",
        "DR-single",
        "DR-ensemble (best SSIM)",
        "DR-ensemble (best PSNR)",
        "DR-ensemble (attacker's choice)",
        "Adaptive",
        "N=1 (best SSIM)",
        "N=1 (best PSNR)",
        "N=1 (attacker's choice)",
    ]
    # every row but the attacker's-choice ones (not in the paper) has a paper column
    assert {n for n in names if "attacker's choice" not in n} == set(PAPER_TABLE1)
    for row in results["rows"]:
        assert 0 <= row["accuracy"] <= 1 and -1 <= row["ssim"] <= 1 and row["psnr"] > 0
        # the smoke preset runs two independent attackers; the row is their mean
        assert len(row["trials"]) == 2
        assert row["ssim"] == pytest.approx(sum(t["ssim"] for t in row["trials"]) / 2)
    assert results["acceptance"]["trials"] == 2
    # the attack inverted what the server process recorded, which is what the client sent
    for check in results["serving"].values():
        assert check["recorded"] == 32 and check["max_abs_diff_to_client_encoding"] < 1e-5
    assert results["acceptance"]["evaluated"]
    assert (run / "grids" / "overview.png").is_file()
    html = (run / "report.html").read_text()
    assert "paper: SSIM" in html and "0.4363" in html and " ± " in html
    assert not (run / "recordings" / "none").exists()  # deleted once attacked
    assert "report.html" in capsys.readouterr().out
