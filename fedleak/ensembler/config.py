"""Ensembler experiment settings: ``presets/defaults.toml`` is the schema, a preset overrides it.

Kept apart from ``fedleak.config`` (the federation's run config): these settings never travel
through Flower, and a key unknown here is an error rather than a silently ignored typo.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from fedleak.config import coerce, merge, parse_value, read_config_file
from fedleak.errors import ConfigError

DEFENSES = ("none", "shredder", "single", "dr-single", "dr-ensemble", "ensembler")
PRESETS = "fedleak.ensembler.presets"

Config = dict[str, Any]


def _read(name: str) -> dict[str, Any]:
    return tomllib.loads(resources.files(PRESETS).joinpath(f"{name}.toml").read_text("utf-8"))


def defaults() -> Config:
    cfg = _read("defaults")
    cfg["preset"] = ""
    return cfg


def preset_names() -> list[str]:
    names = (f.name[:-5] for f in resources.files(PRESETS).iterdir() if f.name.endswith(".toml"))
    return sorted(n for n in names if n != "defaults")


def load_preset(name: str, overrides: list[str] | None = None) -> Config:
    """A preset name (or a TOML file path) merged over the defaults, then ``key=value`` sets."""
    if name.endswith(".toml"):
        preset = read_config_file(name)
    elif name in preset_names():
        preset = _read(name)
    else:
        raise ConfigError(f"unknown ensembler preset '{name}' (known: {', '.join(preset_names())})")
    cfg = merge(defaults(), preset, where=name)
    cfg["preset"] = name
    for item in overrides or []:
        apply_override(cfg, item)
    return validate(cfg)


def apply_override(cfg: Config, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value or section.key=value")
    key, _, raw = item.partition("=")
    key, value = key.strip(), parse_value(raw.strip())
    parts = key.split(".")
    if len(parts) == 2 and isinstance(cfg.get(parts[0]), dict) and parts[1] in cfg[parts[0]]:
        cfg[parts[0]][parts[1]] = coerce(key, cfg[parts[0]][parts[1]], value)
    elif len(parts) == 1 and key in cfg and not isinstance(cfg[key], dict) and key != "preset":
        cfg[key] = coerce(key, cfg[key], value)
    else:
        raise ConfigError(f"unknown config key '{key}'")


def validate(cfg: Config) -> Config:
    data, ens, base = cfg["data"], cfg["ensembler"], cfg["baselines"]
    unknown = [d for d in base["defenses"] if d not in DEFENSES]
    if unknown or not base["defenses"]:
        raise ConfigError(f"baselines.defenses: unknown {unknown} (known: {', '.join(DEFENSES)})")
    if "none" not in base["defenses"]:
        raise ConfigError("baselines.defenses must include 'none': accuracy changes are vs NONE")
    if not 1 <= ens["selected"] <= ens["num-nets"]:
        raise ConfigError("ensembler.selected (P) must be in 1..ensembler.num-nets (N)")
    for key in ("client-train", "aux", "eval"):
        if data[key] < 2:
            raise ConfigError(f"data.{key} must be at least 2")
    for section, key in (
        ("train", "epochs"),
        ("train", "batch-size"),
        ("attack", "batch-size"),
        ("attack", "restarts"),
        ("attack", "trials"),
    ):
        if cfg[section][key] < 1:
            raise ConfigError(f"{section}.{key} must be at least 1")
    if not 0.0 <= base["dropout"] < 1.0:
        raise ConfigError("baselines.dropout must be in [0, 1)")
    if cfg["threads"] < 1:
        raise ConfigError("threads must be at least 1")
    return cfg


def section(cfg: Config, *names: str) -> dict[str, Any]:
    """The named sections plus seed and dataset: what a cached artefact depends on."""
    out: dict[str, Any] = {"seed": cfg["seed"]}
    for name in names:
        out[name] = cfg[name]
    return out
