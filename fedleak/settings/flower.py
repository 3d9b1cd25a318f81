"""The one pair of conversions between fedleak's settings and Flower's configs.

- Run config (every node and the ServerApp see it): ``section.key`` scalars of the public
  sections, plus ``num-participants``. The attackers' ``[attack]`` settings are private and never
  go there. The Simulation Engine cannot give virtual nodes their own node config, so for it the
  participants' node configs travel in the run config too, as JSON under ``participants``.
- Node config (one SuperNode's private identity): its ``ParticipantSpec`` and, for an attacker,
  ``attack.<key>`` entries.

``pyproject.toml``'s ``[tool.flwr.app.config]`` must declare every run-config key (Flower drops
keys the app does not declare); tests/test_settings.py checks it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedleak.errors import ConfigError
from fedleak.settings.base import validate
from fedleak.settings.federation import AttackSettings, FederationSettings, ParticipantSpec

PUBLIC_SECTIONS = (
    "run",
    "data",
    "model",
    "train",
    "protocol",
    "eval",
    "server",
    "defense",
    "deployment",
    "simulation",
)
PARTICIPANTS = "participants"
NUM_PARTICIPANTS = "num-participants"
ATTACK_PREFIX = "attack."
INDEX = "index"
PARTITION_ID = "partition-id"  # what the Simulation Engine puts in a virtual node's node config


@dataclass(frozen=True)
class NodeIdentity:
    """Who a node is: its participant spec, and its attack settings if it is an attacker."""

    spec: ParticipantSpec
    attack: AttackSettings | None


# --- run config -------------------------------------------------------------------------------


def to_run_config(settings: FederationSettings, *, include_participants: bool) -> dict[str, Any]:
    dumped = settings.to_toml_dict()
    flat: dict[str, Any] = {
        f"{section}.{key}": value
        for section in PUBLIC_SECTIONS
        for key, value in dumped[section].items()
    }
    flat["description"] = settings.description
    flat["preset"] = settings.preset
    nodes = [to_node_config(spec, settings.attack) for spec in settings.specs()]
    flat[PARTICIPANTS] = json.dumps(nodes) if include_participants else "[]"
    flat[NUM_PARTICIPANTS] = len(nodes)
    return flat


def from_run_config(run_config: Mapping[str, Any]) -> FederationSettings:
    """The settings a ServerApp or ClientApp reads back; participants only as many placeholders
    as there are nodes (their identities are private to each node)."""
    return _from_run_config(tuple(sorted(run_config.items())))


@lru_cache(maxsize=4)
def _from_run_config(items: tuple[tuple[str, Any], ...]) -> FederationSettings:
    data: dict[str, Any] = {}
    for key, value in items:
        section, _, sub = key.partition(".")
        if section in PUBLIC_SECTIONS and sub:
            data.setdefault(section, {})[sub] = value
        elif key in ("description", "preset"):
            data[key] = value
    count = int(dict(items).get(NUM_PARTICIPANTS, 1))
    data[PARTICIPANTS] = [{"role": "honest", "count": max(1, count)}]
    return validate(FederationSettings, data, "run config")


# --- node config ------------------------------------------------------------------------------


def to_node_config(spec: ParticipantSpec, attack: AttackSettings) -> dict[str, Any]:
    """A participant's node config as a dict of scalars (Flower's node-config values)."""
    node = spec.to_toml_dict()
    if spec.is_attacker:
        node.update({ATTACK_PREFIX + k: v for k, v in attack.to_toml_dict().items()})
    return node


def node_config_arg(node: Mapping[str, Any]) -> str:
    """The ``flower-supernode --node-config`` string: space-separated ``key=TOML value``."""
    return " ".join(f"{key}={_toml_scalar(value)}" for key, value in node.items())


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def from_node_config(node: Mapping[str, Any], where: str = "node config") -> NodeIdentity:
    own = {k: v for k, v in node.items() if not k.startswith(ATTACK_PREFIX)}
    attack = {k[len(ATTACK_PREFIX) :]: v for k, v in node.items() if k.startswith(ATTACK_PREFIX)}
    spec = validate(ParticipantSpec, own, where)
    if not spec.is_attacker:
        if attack:
            raise ConfigError(f"{where}: attack.* settings are for attackers")
        return NodeIdentity(spec, None)
    return NodeIdentity(spec, validate(AttackSettings, attack, where))


def node_identity(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> NodeIdentity:
    """This node's identity: its own node config (Deployment Engine), else its entry in the run
    config by partition id (Simulation Engine). Parsed once per process, however many mods and
    handlers ask."""
    participants = str(run_config.get(PARTICIPANTS, "[]"))
    return _node_identity(tuple(sorted(node_config.items())), participants)


@lru_cache(maxsize=64)
def _node_identity(node_items: tuple[tuple[str, Any], ...], participants: str) -> NodeIdentity:
    node = dict(node_items)
    if INDEX in node or "role" in node:  # a node config of its own names its index too
        return from_node_config(node)
    nodes = json.loads(participants or "[]")
    index = int(node.get(PARTITION_ID, -1))
    if not 0 <= index < len(nodes):
        raise ConfigError(
            "this node has no participant identity: start its SuperNode with `fedleak node "
            "PRESET --participant I` (Deployment) or list participants in the run config "
            "(Simulation)"
        )
    return from_node_config(nodes[index], where=f"participants.{index} in the run config")
