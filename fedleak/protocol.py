"""What both sides of the federation's protocol agree on, in one neutral module (as Flower keeps
``KEY_CLIPPING_NORM`` where both its client mod and its strategy wrapper read it).

- record names inside a message's ``RecordDict``;
- the training instructions the server declares every round (:class:`Instructions`);
- the metric keys a training reply carries.

No torch and no Flower import here: the settings, the strategies, the client mods and the
attackers all read these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Literal

# Record names in a message's RecordDict.
ARRAYS = "arrays"  # the model (server -> client) or the trained model / sparse update (reply)
CONFIG = "config"  # the round's Instructions
METRICS = "metrics"  # a reply's metrics
DOWNLOAD_MASK = "download-mask"  # collaborative: which downloaded entries carry the global value

# Metric keys of a reply.
NUM_EXAMPLES = "num-examples"  # examples behind the update: FedAvg's weight
TRAIN_LOSS = "train-loss"
UPLOADED_FRACTION = "uploaded-fraction"  # collaborative: share of entries uploaded
RESYNC = "collaborative-resync"  # collaborative: 1.0 = "I lost my model, send me everything"
EVAL_ACCURACY = "eval-accuracy"

ProtocolKind = Literal["fedavg", "fedsgd", "collaborative"]


@dataclass(frozen=True)
class Instructions:
    """The training procedure the server declares each round; every client follows it, and an
    inversion attacker models it. Keys on the wire are kebab-case (``server-round``)."""

    server_round: int
    protocol: ProtocolKind
    lr: float
    lr_decay: float = 0.0
    momentum: float = 0.0
    batch_size: int = 64
    local_batches: int = 1
    examples_per_round: int = 0
    cohort_size: int = 0  # fedavg/fedsgd: how many clients train this round
    # the collaborative protocol's upload rule (Shokri & Shmatikov)
    theta_u: float = 1.0
    tau: float = 0.0
    gamma: float = 0.0
    dp_epsilon: float = 0.0

    def to_record(self) -> dict[str, int | float | str]:
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Instructions:
        """Instructions from a received config record; ValueError says what is wrong."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in record:
                if f.default is MISSING:
                    raise ValueError(f"the round's config has no '{key}'")
                continue
            values[f.name] = record[key]
        out = cls(**values)
        out.check()
        return out

    def check(self) -> None:
        if self.protocol not in ("fedavg", "fedsgd", "collaborative"):
            raise ValueError(f"unknown protocol {self.protocol!r}")
        for name in ("lr", "lr_decay", "momentum", "theta_u", "tau", "gamma", "dp_epsilon"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"'{name.replace('_', '-')}' must be a finite number >= 0")
        for name in ("server_round", "batch_size", "local_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"'{name.replace('_', '-')}' must be an integer >= 1")

    @property
    def fixed_examples(self) -> bool:
        """Whether a client trains on a fixed draw of examples this round (fedsgd, or fedavg with
        examples-per-round): then the round's batch is recomputable and invertible."""
        return self.protocol == "fedsgd" or (
            self.protocol == "fedavg" and self.examples_per_round > 0
        )

    @property
    def examples(self) -> int | None:
        """How many examples every reply must declare, where the procedure fixes it."""
        if self.protocol == "fedsgd":
            return self.batch_size
        if self.fixed_examples:
            return self.examples_per_round
        return None

    @property
    def steps(self) -> int:
        return 1 if self.protocol == "fedsgd" else self.local_batches
