"""Typed settings for every fedleak command, loaded from presets (TOML) and ``--set`` overrides.

    load_federation("gan-mnist", ["run.rounds=10"])  -> FederationSettings
    load_study("dlg-models", [...])                 -> DlgModelsSettings (a StudySettings)
    load_ensembler("ensembler-cifar10-smoke")       -> EnsemblerSettings

Presets live in ``fedleak/presets/`` (federation), ``fedleak/presets/studies/`` and
``fedleak/presets/ensembler/``; a path ending in ``.toml`` loads a user's own file. Nothing here
imports torch: a typo in a preset name, key or value fails in a fraction of a second.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fedleak.errors import ConfigError
from fedleak.settings.base import Section, read_toml, set_in, split_override, suggestion, validate
from fedleak.settings.ensembler import EnsemblerSettings
from fedleak.settings.federation import (
    AttackSettings,
    FederationSettings,
    ParticipantSpec,
    Target,
)
from fedleak.settings.inversion import InversionSettings
from fedleak.settings.studies import STUDIES, StudySettings

Kind = Literal["federation", "study", "ensembler"]
_FOLDERS: dict[str, tuple[str, ...]] = {
    "federation": (),
    "study": ("studies",),
    "ensembler": ("ensembler",),
}
_LABELS = {"federation": "preset", "study": "study", "ensembler": "ensembler preset"}

__all__ = [
    "AttackSettings",
    "EnsemblerSettings",
    "FederationSettings",
    "InversionSettings",
    "ParticipantSpec",
    "Section",
    "StudySettings",
    "Target",
    "dump_toml",
    "load_ensembler",
    "load_federation",
    "load_study",
    "preset_description",
    "preset_names",
]


def _folder(kind: Kind):
    folder = resources.files("fedleak.presets")
    for part in _FOLDERS[kind]:
        folder = folder.joinpath(part)
    return folder


def preset_names(kind: Kind = "federation") -> list[str]:
    names = (f.name[:-5] for f in _folder(kind).iterdir() if f.name.endswith(".toml"))
    return sorted(names)


def _preset_dict(kind: Kind, name: str) -> dict[str, Any]:
    if name.endswith(".toml") and kind != "study":
        return read_toml(name)
    known = preset_names(kind)
    if name not in known:
        raise ConfigError(
            f"unknown {_LABELS[kind]} '{name}'{suggestion(name, known)} (known: {', '.join(known)})"
        )
    return read_toml(Path(str(_folder(kind).joinpath(f"{name}.toml"))))


def _load(kind: Kind, model: type[Section], name: str, overrides: list[str] | None) -> Any:
    data = _preset_dict(kind, name)
    for item in overrides or []:
        path, value = split_override(item)
        if path[0] == "preset":
            raise ConfigError(f"override '{item}': the preset is chosen by name, not with --set")
        set_in(data, path, value, item)
    data["preset"] = name
    return validate(model, data, f"{_LABELS[kind]} {name}")


def load_federation(name: str, overrides: list[str] | None = None) -> FederationSettings:
    return _load("federation", FederationSettings, name, overrides)


def load_ensembler(name: str, overrides: list[str] | None = None) -> EnsemblerSettings:
    return _load("ensembler", EnsemblerSettings, name, overrides)


def load_study(name: str, overrides: list[str] | None = None) -> StudySettings:
    if name not in STUDIES:
        known = sorted(STUDIES)
        raise ConfigError(
            f"unknown study '{name}'{suggestion(name, known)} (known: {', '.join(known)})"
        )
    return _load("study", STUDIES[name][0], name, overrides)


def preset_description(kind: Kind, name: str) -> str:
    """A preset's one-line description, or why it cannot be loaded (for listings)."""
    try:
        loader = {"federation": load_federation, "study": load_study, "ensembler": load_ensembler}
        return loader[kind](name).description
    except ConfigError as err:
        return f"(unavailable: {err})"


def dump_toml(settings: Section) -> str:
    """The resolved settings as TOML, the form a preset file takes."""
    return tomli_w.dumps(settings.to_toml_dict())
