"""Run configuration: defaults as the schema, presets as overrides, strict validation.

The same resolved config reaches every role: the server and clients read it back from Flower's
flat run config, and each participant's private settings travel in its own node config.
"""

from __future__ import annotations

import copy
import json
import tomllib
from importlib import resources
from typing import Any

from fedleak.errors import ConfigError

ROLES = ("honest", "attacker")
ENGINES = ("simulation", "deployment")
PROTOCOLS = ("collaborative", "fedavg", "fedsgd")
ATTACK_MODES = ("active", "passive", "inversion")  # GAN variants, gradient inversion
PARTITIONS = ("labels", "iid", "dirichlet")
# Keys a participant may carry; attack.* settings are merged into an attacker's entry.
PARTICIPANT_KEYS = {"role", "classes", "target-class", "fake-class", "mode", "state-dir", "out-dir"}

Config = dict[str, Any]


def _load_toml(name: str) -> dict[str, Any]:
    text = resources.files("fedleak.presets").joinpath(f"{name}.toml").read_text("utf-8")
    return tomllib.loads(text)


def defaults() -> Config:
    cfg = _load_toml("defaults")
    cfg["participants"] = []
    cfg["description"] = ""
    cfg["preset"] = ""
    return cfg


def preset_names() -> list[str]:
    files = resources.files("fedleak.presets").iterdir()
    names = (f.name[:-5] for f in files if f.name.endswith(".toml"))
    return sorted(n for n in names if n != "defaults")


def read_config_file(path: str) -> dict[str, Any]:
    """A user's TOML config file, or a one-line ConfigError saying what is wrong with it."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err


def load_preset(name: str, overrides: list[str] | None = None) -> Config:
    """Resolve a preset (or a path to a TOML file) plus `section.key=value` overrides."""
    if name.endswith(".toml"):
        preset = read_config_file(name)
    elif name in preset_names():
        preset = _load_toml(name)
    else:
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(preset_names())})")
    cfg = merge(defaults(), preset, where=name)
    cfg["preset"] = name
    for item in overrides or []:
        apply_override(cfg, item)
    return validate(cfg)


def merge(base: Config, update: dict[str, Any], where: str = "config") -> Config:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in out:
            raise ConfigError(f"unknown config key '{key}' in {where}")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' in {where} must be a table")
            for sub, subval in value.items():
                if sub not in out[key]:
                    raise ConfigError(f"unknown config key '{key}.{sub}' in {where}")
                out[key][sub] = coerce(f"{key}.{sub}", out[key][sub], subval)
        elif key == "participants":
            out[key] = [dict(p) for p in value]
        else:
            out[key] = coerce(key, out[key], value)
    return out


def coerce(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, list):
        if isinstance(value, str):  # `--set baselines.defenses=none,ensembler`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    kind = type(default).__name__
    raise ConfigError(f"config key '{key}' expects {kind}, got {value!r}")


def parse_value(text: str) -> Any:
    """A `--set` value is TOML (`3`, `0.1`, `true`, `"x"`); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(cfg: Config, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, _, raw = item.partition("=")
    key, value = key.strip(), parse_value(raw.strip())
    parts = key.split(".")
    if parts[0] == "participants":
        _override_participant(cfg, parts, value, item)
    elif len(parts) == 2 and isinstance(cfg.get(parts[0]), dict) and parts[1] in cfg[parts[0]]:
        cfg[parts[0]][parts[1]] = coerce(key, cfg[parts[0]][parts[1]], value)
    elif len(parts) == 1 and key in ("description",):
        cfg[key] = str(value)
    else:
        raise ConfigError(f"unknown config key '{key}'")


def _override_participant(cfg: Config, parts: list[str], value: Any, item: str) -> None:
    if len(parts) != 3 or not parts[1].isdigit():
        raise ConfigError(f"override '{item}': use participants.<index>.<key>=value")
    index, key = int(parts[1]), parts[2]
    if index >= len(cfg["participants"]):
        raise ConfigError(f"override '{item}': there are {len(cfg['participants'])} participants")
    if key not in PARTICIPANT_KEYS:
        raise ConfigError(f"unknown participant key '{key}' (known: {sorted(PARTICIPANT_KEYS)})")
    cfg["participants"][index][key] = value


def validate(cfg: Config) -> Config:
    run, proto = cfg["run"], cfg["protocol"]
    _choice("run.engine", run["engine"], ENGINES)
    _choice("run.protocol", run["protocol"], PROTOCOLS)
    _choice("data.partition", cfg["data"]["partition"], PARTITIONS)
    if run["rounds"] < 1:
        raise ConfigError("run.rounds must be at least 1")
    for key in ("theta-d", "theta-u"):
        if not 0.0 < proto[key] <= 1.0:
            raise ConfigError(f"protocol.{key} must be in (0, 1], got {proto[key]}")
    for key in ("tau", "gamma", "dp-epsilon"):
        if proto[key] < 0:
            raise ConfigError(f"protocol.{key} must be >= 0, got {proto[key]}")
    if proto["dp-epsilon"] > 0 and proto["gamma"] <= 0:
        raise ConfigError(
            "protocol.dp-epsilon needs protocol.gamma > 0 (it bounds the sensitivity)"
        )
    if cfg["train"]["batch-size"] < 1 or cfg["train"]["local-batches"] < 1:
        raise ConfigError("train.batch-size and train.local-batches must be at least 1")
    if not cfg["participants"]:
        raise ConfigError("the config has no [[participants]]")
    _validate_inversion(cfg)
    _validate_defense(cfg)
    for i, p in enumerate(cfg["participants"]):
        validate_participant(p, cfg["model"]["num-classes"], where=f"participants.{i}")
    return cfg


def validate_participant(p: dict[str, Any], num_classes: int, where: str = "participant") -> None:
    from fedleak.data.partition import parse_classes

    unknown = set(p) - PARTICIPANT_KEYS - {f"attack.{k}" for k in _attack_keys()}
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}")
    if p.get("role") not in ROLES:
        raise ConfigError(f"unknown role {p.get('role')!r} in {where} (known: {', '.join(ROLES)})")
    classes = parse_classes(p.get("classes", ""))
    if any(c < 0 or c >= num_classes for c in classes):
        raise ConfigError(f"{where}.classes {classes} outside 0..{num_classes - 1}")
    if p["role"] == "attacker":
        _choice(f"{where}.mode", p.get("mode", "active"), ATTACK_MODES)
        if p.get("mode") == "inversion":
            return
        for key in ("target-class", "fake-class"):
            value = p.get(key)
            if not isinstance(value, int) or not 0 <= value < num_classes:
                raise ConfigError(f"{where}.{key} must be a class index, got {value!r}")


def _validate_defense(cfg: Config) -> None:
    from fedleak.clients.defenses import parse_defenses

    defense = cfg["defense"]
    try:
        parse_defenses(defense["client"])
    except ValueError as err:
        raise ConfigError(f"defense.client: {err}") from err
    for key in ("local-dp-epsilon", "local-dp-delta", "server-dp-noise"):
        if defense[key] < 0:
            raise ConfigError(f"defense.{key} must be >= 0")
    for key in ("local-dp-clip", "server-dp-clip"):
        if defense[key] <= 0:
            raise ConfigError(f"defense.{key} must be > 0")
    uses = defense["client"] != "none" or defense["local-dp-epsilon"] or defense["server-dp-noise"]
    if uses and cfg["run"]["protocol"] == "collaborative":
        raise ConfigError(
            "the defense.* settings apply to fedavg/fedsgd (collaborative has its own)"
        )
    if defense["local-dp-epsilon"] and not 0 < defense["local-dp-delta"] < 1:
        raise ConfigError("defense.local-dp-delta must be in (0, 1)")


def _validate_inversion(cfg: Config) -> None:
    """Gradient inversion needs updates it can model: plain SGD steps on a known batch."""
    inverting = cfg["server"]["curious"] or any(
        p.get("mode") == "inversion" for p in cfg["participants"]
    )
    if not inverting:
        return
    run, train = cfg["run"], cfg["train"]
    if run["protocol"] == "collaborative":
        raise ConfigError("gradient inversion runs on the fedsgd or fedavg protocol")
    if run["protocol"] == "fedavg" and train["examples-per-round"] < 1:
        raise ConfigError("gradient inversion on fedavg needs train.examples-per-round > 0")
    if train["momentum"] != 0 or train["lr-decay"] != 0:
        raise ConfigError("gradient inversion assumes plain SGD: train.momentum = lr-decay = 0")
    from fedleak.attacker.inversion import ATTACKS, OptimizationAttack

    # The generative-prior attacks need a prior trained for the dataset; they run in the
    # gias-vs-ig study, not (yet) inside the federation.
    usable = sorted(n for n, cls in ATTACKS.items() if issubclass(cls, OptimizationAttack))
    for name in (cfg["attack"]["inversion"], cfg["server"]["inversion"]):
        if name not in usable:
            known = f"usable in the federation: {', '.join(usable)}"
            if name in ATTACKS:
                raise ConfigError(f"inversion attack {name!r} needs a generative prior ({known})")
            raise ConfigError(f"unknown inversion attack {name!r} ({known})")


def _attack_keys() -> set[str]:
    return set(defaults()["attack"])


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def participant_spec(cfg: Config, index: int) -> dict[str, Any]:
    """What one participant's node is told: its own entry, plus attack settings if attacker."""
    p = dict(cfg["participants"][index])
    p.setdefault("classes", "")
    if isinstance(p["classes"], list):
        p["classes"] = ",".join(str(c) for c in p["classes"])
    if p["role"] == "attacker":
        p.setdefault("mode", "active")
        p.update({f"attack.{k}": v for k, v in cfg["attack"].items()})
    return p


# --- Flower run config ---------------------------------------------------------------------

FLAT_SECTIONS = ("run", "data", "model", "train", "protocol", "eval", "server", "defense")


def to_run_config(cfg: Config, include_participants: bool) -> dict[str, Any]:
    """Flower's flat run config. Participants' private settings are included only for the
    Simulation Engine, which cannot give each virtual node its own node config."""
    flat = {f"{s}.{k}": v for s in FLAT_SECTIONS for k, v in cfg[s].items()}
    specs = [participant_spec(cfg, i) for i in range(len(cfg["participants"]))]
    flat["participants"] = json.dumps(specs) if include_participants else "[]"
    flat["num-participants"] = len(specs)
    return flat


def from_run_config(run_config: dict[str, Any]) -> Config:
    cfg = defaults()
    for key, value in run_config.items():
        section, _, sub = key.partition(".")
        if section in FLAT_SECTIONS and sub in cfg[section]:
            cfg[section][sub] = coerce(key, cfg[section][sub], value)
    cfg["participants"] = json.loads(str(run_config.get("participants", "[]")) or "[]")
    cfg["num-participants"] = int(run_config.get("num-participants", len(cfg["participants"])))
    return cfg


def to_node_config(spec: dict[str, Any]) -> str:
    """A participant's settings as a `flower-supernode --node-config` string (TOML values)."""
    parts = []
    for key, value in spec.items():
        parts.append(f"{key}={json.dumps(value) if isinstance(value, str) else _toml(value)}")
    return " ".join(parts)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
