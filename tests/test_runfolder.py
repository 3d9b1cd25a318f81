"""The run folder contract: naming, crash-safe writes, tolerant reads."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from fedleak import runfolder
from fedleak.errors import Terminated
from fedleak.runfolder import RunFolder


def _strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, which plain json.loads would accept."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _stray_tmp_files(root) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_create_names_folder_after_time_and_name(tmp_path):
    run = RunFolder.create(tmp_path / "runs", "smoke")
    assert re.fullmatch(r"\d{8}-\d{6}-smoke", run.path.name), run.path.name
    assert run.path.parent == tmp_path / "runs"
    for sub in ("samples", "grids", "plots", "logs"):
        assert (run.path / sub).is_dir()


def test_create_collision_gets_numbered_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder, "_timestamp", lambda: "20240102-030405")
    names = [RunFolder.create(tmp_path, "gan mnist/dp").path.name for _ in range(3)]
    assert names == [
        "20240102-030405-gan-mnist-dp",
        "20240102-030405-gan-mnist-dp-2",
        "20240102-030405-gan-mnist-dp-3",
    ]


def test_append_then_torn_last_line_keeps_complete_records(tmp_path):
    run = RunFolder(tmp_path)
    records = [{"round": r, "test_accuracy": 0.1 * r} for r in range(1, 4)]
    for rec in records:
        run.append_jsonl("metrics.jsonl", rec)
    with open(run.path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"round": 4, "test_acc')  # what a kill in the middle of a write leaves

    assert run.read_jsonl("metrics.jsonl") == records
    assert run.read_jsonl_checked("metrics.jsonl") == (records, 1)

    # The next append must not be glued onto the torn line and lost with it.
    run.append_jsonl("metrics.jsonl", {"round": 5})
    assert run.read_jsonl("metrics.jsonl") == [*records, {"round": 5}]


def test_read_jsonl_skips_corrupt_lines_and_missing_file(tmp_path):
    run = RunFolder(tmp_path)
    (run.path / "attack.jsonl").write_text('{"round": 1}\nnot json\n[1, 2]\n\n{"round": 2}\n')
    assert run.read_jsonl("attack.jsonl") == [{"round": 1}, {"round": 2}]
    assert run.read_jsonl_checked("attack.jsonl")[1] == 2
    assert run.read_jsonl("missing.jsonl") == []


def test_non_finite_values_become_null(tmp_path):
    run = RunFolder(tmp_path)
    run.append_jsonl(
        "metrics.jsonl",
        {"a": math.nan, "b": math.inf, "c": [-math.inf, 1.5], "d": np.float32("nan"), "e": 2},
    )
    line = (run.path / "metrics.jsonl").read_text().splitlines()[0]
    assert _strict_loads(line) == {"a": None, "b": None, "c": [None, 1.5], "d": None, "e": 2}

    run.write_json("config.json", {"x": {"y": math.nan}})
    assert _strict_loads((run.path / "config.json").read_text()) == {"x": {"y": None}}


def test_write_json_is_atomic_and_leaves_no_tmp_files(tmp_path, monkeypatch):
    run = RunFolder(tmp_path)
    run.write_json("config.json", {"b": 1, "a": {"z": [1, 2]}})
    text = (run.path / "config.json").read_text()
    assert json.loads(text) == {"a": {"z": [1, 2]}, "b": 1}
    assert text.index('"a"') < text.index('"b"'), "sort_keys"
    assert _stray_tmp_files(run.path) == []

    # An object JSON cannot hold: the old file stays as it was.
    with pytest.raises(TypeError):
        run.write_json("config.json", {"bad": object()})
    assert (run.path / "config.json").read_text() == text

    # A failure at the rename: old content intact and the temporary file removed.
    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        run.write_json("config.json", {"new": True})
    assert (run.path / "config.json").read_text() == text
    assert _stray_tmp_files(run.path) == []


def test_read_json_default_on_missing_or_corrupt(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_json("meta.json", {"d": 1}) == {"d": 1}
    (run.path / "meta.json").write_text("{trunc")
    assert run.read_json("meta.json") is None


def test_write_meta_merges(tmp_path):
    run = RunFolder(tmp_path)
    run.write_meta(status="running", seed=3, started=runfolder.now_iso())
    run.write_meta(status="finished", message="ok")
    meta = run.read_json("meta.json")
    assert meta["status"] == "finished"
    assert meta["seed"] == 3 and meta["message"] == "ok" and "started" in meta


def test_versions_lists_packages_and_none_for_missing(monkeypatch):
    v = RunFolder.versions()
    for key in ("python", "platform", "fedleak", "flwr", "torch", "torchvision", "numpy"):
        assert key in v
    assert v["torch"] and v["flwr"] and v["numpy"]
    monkeypatch.setattr(runfolder, "_VERSION_PACKAGES", ("torch", "fedleak-no-such-dist"))
    v = RunFolder.versions()
    assert v["fedleak-no-such-dist"] is None and v["torch"]


# --- the one run lifecycle -----------------------------------------------------------------


def _open(tmp_path, reports):
    return runfolder.open_run(
        tmp_path,
        "t",
        kind="study",
        config={"a": 1},
        meta={"seed": 3},
        report=lambda path: reports.append(path),
    )


def test_lifecycle_records_a_finished_run_and_writes_the_report(tmp_path):
    reports = []
    with _open(tmp_path, reports) as (run, outcome):
        assert run.read_json("meta.json")["status"] == "running"
        outcome.message = "all good"
    meta = run.read_json("meta.json")
    assert meta["status"] == "finished" and meta["message"] == "all good" and meta["seed"] == 3
    assert meta["kind"] == "study" and meta["launcher"]["pid"] > 0 and meta["finished"]
    assert run.read_json("config.json") == {"a": 1} and reports == [run.path]


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (RuntimeError("boom"), "failed", "RuntimeError: boom"),
        (KeyboardInterrupt(), "stopped", "stopped by Ctrl-C"),
        (Terminated(15), "stopped", "stopped by SIGTERM"),
    ],
)
def test_lifecycle_records_how_a_run_ended_whatever_ends_it(tmp_path, error, status, message):
    reports = []
    with pytest.raises(type(error)), _open(tmp_path, reports) as (run, _):
        raise error
    meta = run.read_json("meta.json")
    assert meta["status"] == status and meta["message"] == message and reports == [run.path]
    if status == "failed":
        assert "Traceback" in meta["traceback"]


def test_a_failing_report_does_not_hide_the_runs_outcome(tmp_path):
    def broken(path):
        raise ValueError("template bug")

    with runfolder.open_run(tmp_path, "t", kind="x", config={}, meta={}, report=broken) as (
        run,
        outcome,
    ):
        outcome.status = runfolder.Status.DEGRADED
    meta = run.read_json("meta.json")
    assert meta["status"] == "degraded" and "template bug" in meta["report_error"]


def test_a_run_whose_launcher_vanished_is_marked_failed(tmp_path):
    import subprocess
    import sys

    run = RunFolder.create(tmp_path, "lost")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run.write_meta(
        status="running",
        launcher={"pid": gone.pid, "host": runfolder.socket.gethostname(), "start": "1"},
    )
    assert runfolder.reconcile(run)
    meta = run.read_json("meta.json")
    assert meta["status"] == "failed" and "launcher lost" in meta["message"]
    # A live launcher (this process) is left alone.
    alive = RunFolder.create(tmp_path, "alive")
    alive.write_meta(status="running", launcher=runfolder.launcher_identity())
    assert not runfolder.reconcile(alive)
    assert alive.read_json("meta.json")["status"] == "running"
