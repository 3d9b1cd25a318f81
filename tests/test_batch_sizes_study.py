"""The batch-sizes study: every attack on the same private batches, one table line per size."""

from __future__ import annotations

import json

import pytest

from fedleak.errors import ConfigError
from fedleak.studies import STUDIES, run_study
from fedleak.studies.batch_sizes import TINY_OVERRIDES


def test_batch_sizes_tiny_run(tmp_path, data_root):
    # The study runs on attack.threads (1) torch threads and run_study restores the caller's.
    assert "batch-sizes" in STUDIES
    folder, status = run_study(
        "batch-sizes", TINY_OVERRIDES + [f'data.root="{data_root}"'], tmp_path
    )
    assert status == "finished"
    results = json.loads((folder / "results.json").read_text())
    lines = [(t["attack"], t["batch_size"]) for t in results["table"]]
    assert lines == [(a, b) for a in ("dlg", "idlg", "inverting-gradients") for b in (1, 2)]
    rows = results["rows"]
    assert len(rows) == 6
    # Every attack saw the same private batch of each size.
    for b in (1, 2):
        assert len({tuple(r["indices"]) for r in rows if r["batch_size"] == b}) == 1
    by = {(r["attack"], r["batch_size"]): r for r in rows}
    assert by[("dlg", 1)]["iterations"] == 2 and by[("inverting-gradients", 2)]["iterations"] == 3
    assert by[("inverting-gradients", 1)]["restarts"] == 4  # the preset's own
    assert by[("idlg", 1)]["label_accuracy"] == 1.0  # iDLG's closed form is exact at B = 1
    assert all(r["cpu_seconds"] > 0 and r["evaluations"] > r["iterations"] for r in rows)
    assert (folder / "plots" / "mean_psnr-vs-batch-size.png").stat().st_size > 0
    assert (folder / "grids" / "idlg-b2.png").is_file()
    assert json.loads((folder / "meta.json").read_text())["status"] == "finished"


def test_batch_sizes_rejects_unknown_attacks(tmp_path):
    with pytest.raises(ConfigError, match="attack.names.0: input should be 'dlg'"):
        run_study("batch-sizes", ['attack.names=["gias"]'], tmp_path)
    with pytest.raises(ConfigError, match="attack.batch-sizes.0: input should be greater"):
        run_study("batch-sizes", ["attack.batch-sizes=[0]"], tmp_path)
    assert not any(tmp_path.iterdir())
