import tomllib
from pathlib import Path

import pytest

from fedleak.config import (
    apply_override,
    defaults,
    from_run_config,
    load_preset,
    preset_names,
    to_node_config,
    to_run_config,
)
from fedleak.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_every_preset_resolves():
    names = preset_names()
    assert {"smoke", "demo", "gan-mnist", "gan-mnist-passive", "gan-mnist-dp", "gan-faces"} <= set(
        names
    )
    for name in names:
        cfg = load_preset(name)
        assert cfg["participants"], name


def test_gan_mnist_is_the_paper_setup():
    cfg = load_preset("gan-mnist")
    victim, attacker = cfg["participants"]
    assert (victim["role"], victim["classes"]) == ("honest", "0-4")
    assert (attacker["role"], attacker["classes"], attacker["fake-class"]) == (
        "attacker",
        "5-9",
        10,
    )
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["batch-size"] == 64
    assert cfg["attack"]["gen-lr"] == 0.02
    assert load_preset("gan-mnist-passive")["participants"][1]["mode"] == "passive"
    faces = load_preset("gan-faces")
    assert len(faces["participants"]) == 41 and faces["participants"][-1]["classes"] == ""


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_preset("smoke", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown role 'spy'"):
        load_preset("smoke", ["participants.0.role=spy"])
    with pytest.raises(ConfigError, match="expects float"):
        load_preset("smoke", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="run.engine must be one of"):
        load_preset("smoke", ["run.engine=cloud"])
    with pytest.raises(ConfigError, match="theta-u"):
        load_preset("smoke", ["protocol.theta-u=0"])
    with pytest.raises(ConfigError, match="needs protocol.gamma"):
        load_preset("smoke", ["protocol.dp-epsilon=1"])


def test_overrides_are_typed():
    cfg = load_preset("smoke", ["run.rounds=7", "train.lr=1", "participants.1.target-class=3"])
    assert cfg["run"]["rounds"] == 7
    assert cfg["train"]["lr"] == 1.0 and isinstance(cfg["train"]["lr"], float)
    assert cfg["participants"][1]["target-class"] == 3
    with pytest.raises(ConfigError):
        apply_override(cfg, "no-equals-sign")


def test_preset_file_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[run]\nrounds = 3\n[[participants]]\nrole = "honest"\nclasses = "0-9"\n')
    assert load_preset(str(path))["run"]["rounds"] == 3
    path.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_preset(str(path))


def test_run_config_round_trip():
    cfg = load_preset("gan-mnist")
    flat = to_run_config(cfg, include_participants=True)
    back = from_run_config(flat)
    for section in ("run", "train", "protocol", "eval"):
        assert back[section] == cfg[section]
    assert back["participants"][1]["attack.gen-lr"] == 0.02
    # Deployment: private settings never enter the run config the server sees.
    assert to_run_config(cfg, include_participants=False)["participants"] == "[]"


def test_node_config_is_parsed_by_flower():
    from flwr.common.config import parse_config_args

    spec = {
        "role": "attacker",
        "classes": "5-9",
        "target-class": 0,
        "attack.gen-lr": 1e-7,
        "mode": "active",
    }
    parsed = parse_config_args([to_node_config(spec)])
    assert parsed == spec


def test_pyproject_run_config_declares_every_key():
    """`flwr run --run-config` only overrides keys the app declares."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = to_run_config(defaults() | {"participants": []}, include_participants=True)
    assert set(flat) == set(declared)
