"""The typed settings: presets resolve, bad keys and values are one-line errors naming the key
(with a suggestion), groups expand, what is attacked has one source, and the conversions to and
from Flower's configs are lossless."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedleak.errors import ConfigError
from fedleak.settings import (
    load_ensembler,
    load_federation,
    load_study,
    preset_names,
)
from fedleak.settings.flower import (
    from_node_config,
    from_run_config,
    node_config_arg,
    node_identity,
    to_node_config,
    to_run_config,
)
from fedleak.settings.inversion import FEDERATED_ATTACKS, PRIOR_ATTACKS

REPO = Path(__file__).resolve().parents[1]


def test_every_preset_resolves():
    assert {"smoke", "demo", "gan-mnist", "gan-mnist-passive", "gan-faces"} <= set(preset_names())
    for name in preset_names():
        assert load_federation(name).specs(), name
    for name in preset_names("study"):
        assert load_study(name).preset == name
    for name in preset_names("ensembler"):
        assert load_ensembler(name).preset == name


def test_gan_mnist_is_the_paper_setup():
    s = load_federation("gan-mnist")
    victim, attacker = s.specs()
    assert (victim.role, victim.classes) == ("honest", "0-4")
    assert (attacker.role, attacker.classes, attacker.fake_class) == ("attacker", "5-9", 10)
    assert s.train.lr == 1e-3 and s.train.batch_size == 64 and s.attack.gen_lr == 0.02
    assert load_federation("gan-mnist-passive").specs()[1].mode == "passive"


def test_a_group_expands_into_members_with_their_own_classes():
    faces = load_federation("gan-faces")
    specs = faces.specs()
    assert len(faces.participants) == 2 and faces.num_participants == len(specs) == 41
    assert [s.classes for s in specs[:3]] == ["0", "1", "2"] and specs[39].classes == "39"
    assert specs[40].is_attacker and specs[40].index == 40 and specs[40].classes == ""


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.roundz=3", "unknown key 'run.roundz' (did you mean 'run.rounds'?)"),
        ("participants.0.clases=1", "did you mean 'participants.0.classes'?"),
        ("participants.0.role=spy", "participants.0.role: input should be 'honest' or 'attacker'"),
        ("train.lr=fast", "train.lr: input should be a valid number"),
        ("train.lr=nan", "train.lr: input should be a finite number"),
        ("run.round-timeout=-5", "run.round-timeout: input should be greater than 0"),
        ("run.max-wall-time=nan", "run.max-wall-time: input should be a finite number"),
        ("deployment.superlink-port=99999", "deployment.superlink-port: input should be less"),
        ("run.engine=cloud", "run.engine: input should be 'simulation' or 'deployment'"),
        ("protocol.theta-u=0", "protocol.theta-u: input should be greater than 0"),
        ("protocol.dp-epsilon=1", "needs protocol.gamma > 0"),
        ("participants.5.role=x", "'participants.5' has 2 entries"),
        ('participants="x"', "participants: input should be a valid list"),
        ("participants.1.target-class=30", "participants.1.target-class = 30 outside 0..10"),
        ("attack.inversion=gias", "'gias' needs a generative prior"),
        ("defense.client=topk:2", "topk keeps a fraction in (0, 1]"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match="^preset smoke: |^override ") as err:
        load_federation("smoke", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_names_get_a_suggestion():
    with pytest.raises(ConfigError, match="unknown preset 'demoo' \\(did you mean 'demo'\\?\\)"):
        load_federation("demoo")
    with pytest.raises(ConfigError, match="did you mean 'dlg-models'"):
        load_study("dlg-model")
    with pytest.raises(ConfigError, match="did you mean 'attack.name'"):
        load_study("dlg-models", ["attack.nme=dlg"])


def test_overrides_are_typed_and_ints_are_accepted_for_floats():
    s = load_federation("smoke", ["run.rounds=7", "train.lr=1", "participants.1.target-class=3"])
    assert s.run.rounds == 7 and s.train.lr == 1.0 and isinstance(s.train.lr, float)
    assert s.specs()[1].target_class == 3
    with pytest.raises(ConfigError, match="not of the form"):
        load_federation("smoke", ["no-equals-sign"])


def test_what_is_attacked_has_one_source():
    """The evaluation follows the attacker; eval.target-class may only repeat it."""
    s = load_federation("smoke", ["participants.1.target-class=3"])
    assert [(t.attacker, t.target, t.fake) for t in s.gan_targets()] == [(1, 3, 10)]
    assert s.eval.target_class is None
    with pytest.raises(ConfigError, match="eval.target-class = 0 but participant 1's"):
        load_federation("smoke", ["participants.1.target-class=3", "eval.target-class=0"])
    both = load_federation("smoke", ["participants.1.target-class=3", "eval.target-class=3"])
    assert both.gan_targets()[0].target == 3


def test_several_attackers_each_have_their_own_target(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text(
        '[[participants]]\nrole = "honest"\nclasses = "0-4"\n'
        '[[participants]]\nrole = "attacker"\nclasses = "5-7"\ntarget-class = 0\n'
        '[[participants]]\nrole = "attacker"\nclasses = "8-9"\ntarget-class = 4\nfake-class = 10\n'
    )
    targets = load_federation(str(path)).gan_targets()
    assert [(t.attacker, t.target, t.fake) for t in targets] == [(1, 0, 10), (2, 4, 10)]


def test_preset_file_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[run]\nrounds = 3\n[[participants]]\nrole = "honest"\nclasses = "0-9"\n')
    assert load_federation(str(path)).run.rounds == 3
    path.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_federation(str(path))


def test_run_config_round_trip_keeps_private_settings_off_the_server():
    s = load_federation("gan-mnist")
    back = from_run_config(to_run_config(s, include_participants=True))
    for section in ("run", "train", "protocol", "eval", "server", "defense", "data", "model"):
        assert getattr(back, section) == getattr(s, section), section
    assert back.num_participants == 2
    flat = to_run_config(s, include_participants=False)
    assert flat["participants"] == "[]"
    assert not any(key.startswith("attack.") for key in flat)


def test_node_config_is_parsed_by_flower_into_the_same_identity():
    from flwr.common.config import parse_config_args

    s = load_federation("gan-mnist")
    node = to_node_config(s.specs()[1], s.attack)
    parsed = parse_config_args([node_config_arg(node)])
    identity = from_node_config(parsed)
    assert identity.spec == s.specs()[1] and identity.attack == s.attack
    honest = from_node_config(to_node_config(s.specs()[0], s.attack))
    assert honest.attack is None


def test_simulation_nodes_find_their_identity_by_partition_id():
    s = load_federation("smoke")
    flat = to_run_config(s, include_participants=True)
    assert node_identity({"partition-id": 1}, flat).spec.is_attacker
    with pytest.raises(ConfigError, match="no participant identity"):
        node_identity({"partition-id": 7}, flat)


def test_pyproject_run_config_declares_every_key():
    """Flower drops run-config keys the app does not declare; the declared defaults are smoke."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == to_run_config(load_federation("smoke"), include_participants=True)


def test_attack_names_match_the_registry():
    from fedleak.attacker.inversion import ATTACKS, OptimizationAttack

    federated = {n for n, cls in ATTACKS.items() if issubclass(cls, OptimizationAttack)}
    assert set(FEDERATED_ATTACKS) == federated
    assert set(PRIOR_ATTACKS) == set(ATTACKS) - federated


def test_model_names_match_the_registry():
    from fedleak.models import MODELS
    from fedleak.settings.federation import MODEL_DATASETS

    assert {name: entry[2] for name, entry in MODELS.items()} == MODEL_DATASETS


def test_validation_imports_no_torch():
    """A typo is reported before any heavy import: the settings never load torch."""
    code = (
        "import sys\n"
        "from fedleak.settings import load_federation\n"
        "from fedleak.errors import ConfigError\n"
        "try:\n    load_federation('smoke', ['run.roundz=1'])\n"
        "except ConfigError:\n    pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
