"""Studies: strict presets, run folders with results/report/meta, failures recorded, CLI."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from fedleak import cli
from fedleak.errors import ConfigError
from fedleak.settings import load_study
from fedleak.settings.studies import STUDIES, DlgModelsSettings
from fedleak.studies import run_study
from fedleak.studies.defenses import TINY_OVERRIDES as TINY_DEFENSES
from fedleak.studies.dlg_models import TINY_OVERRIDES as TINY_DLG


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_preset_loading_and_overrides():
    settings = load_study("dlg-models")
    assert isinstance(settings, DlgModelsSettings)
    assert settings.models.names == ["lenet", "resnet18", "densenet121", "inception_v3"]
    assert settings.seed == 0 and settings.description
    settings = load_study(
        "dlg-models",
        ['models.names=["lenet"]', "models.lenet.steps=7", "attack.converge-mse=1", "seed=3"],
    )
    assert settings.models.names == ["lenet"] and settings.models.lenet.steps == 7
    assert settings.attack.converge_mse == 1.0 and isinstance(settings.attack.converge_mse, float)
    assert settings.seed == 3
    assert load_study("inversion-defenses", ["sweep.noise=[0.5]"]).sweep.noise == [0.5]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("attack.stepz=3", "unknown key 'attack.stepz'"),
        ("nosection.steps=3", "unknown key 'nosection'"),
        ("models.lenet=3", "models.lenet: input should be a valid dictionary"),
        ("models.lenet.steps=many", "models.lenet.steps: input should be a valid integer"),
        ("models.sigmoid=1", "models.sigmoid: input should be a valid boolean"),
        ("models.names=lenet", "models.names: input should be a valid list"),
        ("attack.steps", "not of the form"),
    ],
)
def test_overrides_are_strict(override, message):
    with pytest.raises(ConfigError, match=message):
        load_study("dlg-models", [override])


@pytest.mark.parametrize(
    ("study", "override", "message"),
    [
        ("dlg-models", 'models.names=["vgg"]', "models.names.0: input should be 'lenet'"),
        ("dlg-models", 'models.resnet18.bn="frozen"', "input should be 'train' or 'eval'"),
        ("inversion-defenses", "sweep.topk=[1.5]", "sweep.topk.0: input should be less than"),
        ("inversion-defenses", 'attack.distance="l1"', "input should be 'l2' or 'cosine'"),
    ],
)
def test_bad_settings_stop_before_a_folder_exists(tmp_path, study, override, message):
    with pytest.raises(ConfigError, match=message):
        run_study(study, [override], tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_study():
    with pytest.raises(ConfigError, match="unknown study 'nope'"):
        load_study("nope")


def test_dlg_models_tiny_run(tmp_path, data_root):
    folder, status = run_study("dlg-models", TINY_DLG + [f'data.root="{data_root}"'], tmp_path)
    assert status == "finished"
    assert folder.parent == tmp_path and folder.name.endswith("-dlg-models")
    results = json.loads((folder / "results.json").read_text())
    assert set(results) >= {"title", "summary", "rows", "table"}
    assert [r["model"] for r in results["rows"]] == ["lenet", "lenet"]
    assert [t["model"] for t in results["table"]] == ["lenet"]
    for row in results["rows"]:
        assert 0 < row["final_mse"] < 1 and row["steps_run"] == 4
    curves = json.loads((folder / "curves.json").read_text())
    assert [len(c["mse"]) for c in curves["lenet"]] == [4, 4]
    # The recorded curve ends at the image the attack returned.
    assert curves["lenet"][0]["mse"][-1] == pytest.approx(results["rows"][0]["final_mse"])
    assert (folder / "plots" / "mse-lenet.png").stat().st_size > 0
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["seed"] == 0 and meta["versions"]["torch"]
    assert json.loads((folder / "config.json").read_text())["models"]["lenet"]["steps"] == 4
    html = (folder / "report.html").read_text()
    assert results["title"] in html and "mse-lenet.png" in html and "data:image/png" in html
    assert "status <b>finished</b>" in html


def test_defenses_tiny_run(tmp_path, data_root):
    overrides = TINY_DEFENSES + [f'data.root="{data_root}"']
    folder, _ = run_study("inversion-defenses", overrides, tmp_path)
    results = json.loads((folder / "results.json").read_text())
    settings = [t["setting"] for t in results["table"]]
    assert settings == [
        "none B=1 l2",
        "none B=2 l2",
        "topk:0.1 B=1 l2",
        "noise:0.01 B=1 l2",
        "clip:1 B=1 l2",
    ]
    by_setting = {t["setting"]: t for t in results["table"]}
    assert by_setting["none B=1 l2"]["relative_distortion"] == 0
    assert by_setting["noise:0.01 B=1 l2"]["relative_distortion"] > 0
    assert (folder / "plots" / "psnr-vs-noise.png").is_file()
    assert json.loads((folder / "meta.json").read_text())["status"] == "finished"


def test_failing_study_is_recorded(tmp_path, monkeypatch):
    def failing_run(cfg, run):
        (run.path / "partial.txt").write_text("written before the failure")
        raise RuntimeError("boom")

    module = types.ModuleType("fake_failing_study")
    module.run = failing_run
    monkeypatch.setitem(sys.modules, "fake_failing_study", module)
    monkeypatch.setitem(STUDIES, "dlg-models", (DlgModelsSettings, "fake_failing_study"))
    with pytest.raises(RuntimeError, match="boom"):
        run_study("dlg-models", [], tmp_path)
    (folder,) = tmp_path.iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["message"] == "RuntimeError: boom"
    assert "Traceback" in meta["traceback"] and meta["finished"]
    assert (folder / "partial.txt").read_text() == "written before the failure"
    assert "RUN FAILED: RuntimeError: boom" in (folder / "report.html").read_text()
    code = cli.main(["study", "dlg-models", "--out-dir", str(tmp_path / "cli")])
    assert code == 1  # the command line says it failed, in one line, and where to look


def test_cli_lists_studies_and_rejects_bad_overrides(tmp_path, capsys):
    assert cli.main(["study", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in STUDIES)
    code = cli.main(["study", "dlg-models", "--set", "attack.nope=1", "--out-dir", str(tmp_path)])
    assert code == 2
    assert "unknown key 'attack.nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # a bad override stops before any folder exists


def test_cli_report_rebuilds_a_study_report(tmp_path, capsys):
    folder = tmp_path / "study"
    folder.mkdir()
    results = {"title": "T", "summary": ["one sentence"], "rows": [], "table": [{"a": 1.5}]}
    (folder / "results.json").write_text(json.dumps(results))
    meta = {"status": "finished", "study": "x", "kind": "study"}
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "config.json").write_text("{}")
    assert cli.main(["report", str(folder)]) == 0
    html = (folder / "report.html").read_text()
    assert "one sentence" in html and "<td>1.5</td>" in html.replace('<td class="l">', "<td>")
