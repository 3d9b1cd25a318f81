"""Who this node is: its role and private settings.

On the Deployment Engine they come from the SuperNode's own `--node-config`; the Simulation
Engine cannot give virtual nodes their own node config, so it reads the same entry from the run
config by partition id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from flwr.app import Context

from fedleak.config import defaults, validate_participant
from fedleak.data import ImageSet, load_dataset
from fedleak.data.partition import by_labels, dirichlet, iid, parse_classes
from fedleak.errors import ConfigError


@dataclass(frozen=True)
class Participant:
    role: str
    index: int
    classes: tuple[int, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def is_attacker(self) -> bool:
        return self.role == "attacker"

    def attack(self, key: str) -> Any:
        """An attack setting from the node config, else the documented default."""
        return self.settings.get(f"attack.{key}", _attack_defaults()[key])


def participant(context: Context) -> Participant:
    node = dict(context.node_config)
    if "role" in node:
        spec, index = node, int(node.get("index", 0))
    else:
        specs = json.loads(str(context.run_config.get("participants", "[]")) or "[]")
        index = int(node.get("partition-id", -1))
        if not 0 <= index < len(specs):
            raise ConfigError(
                'this node has no role: start its SuperNode with --node-config \'role="honest" '
                'classes="0-4"\' (Deployment) or list participants in the run config (Simulation)'
            )
        spec = specs[index]
    spec = {k: v for k, v in spec.items() if k not in ("partition-id", "num-partitions", "index")}
    validate_participant(spec, int(context.run_config["model.num-classes"]), where="node config")
    return Participant(spec["role"], index, tuple(parse_classes(spec.get("classes", ""))), spec)


@lru_cache(maxsize=1)
def _attack_defaults() -> dict[str, Any]:
    return defaults()["attack"]


@lru_cache(maxsize=8)
def _train_set(dataset: str, root: str) -> ImageSet:
    return load_dataset(dataset, "train", root or None)


def local_data(me: Participant, run_config: dict[str, Any]) -> ImageSet:
    """This participant's private partition of the training set."""
    data = _train_set(str(run_config["data.dataset"]), str(run_config["data.root"]))
    how = run_config["data.partition"]
    parts_total = int(run_config["num-participants"])
    seed = int(run_config["run.seed"])
    if how == "labels":
        return data.subset(by_labels(data.labels.numpy(), [list(me.classes)])[0])
    if how == "iid":
        return data.subset(iid(len(data), parts_total, seed)[me.index])
    parts = dirichlet(data.labels.numpy(), parts_total, float(run_config["data.alpha"]), seed)
    return data.subset(parts[me.index])
