"""Typed records for everything that crosses a process boundary.

Roles send the experimenter what they produced (a round's global model, an attacker's generated
samples, a reconstruction, the server's status); the experimenter writes scores and round metrics
that the report reads back. Each record is a plain dataclass with ``to_dict``/``from_dict`` (JSON
fields) and its arrays kept apart (``tensors``/``from_parts``), so the collector can carry them
without pickling and the run folder stores them as ``.npz``.

Reading is lenient where files may be older or newer than this code (unknown keys are ignored,
missing optional ones take their defaults) and strict about what a record cannot do without.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np

TENSOR = "tensor"


def tensor_field(**kwargs: Any) -> Any:
    """A field holding an array (or a dict of named arrays): carried apart from the JSON."""
    return field(metadata={TENSOR: True}, **kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass
class Record:
    kind: ClassVar[str] = "record"

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get(TENSOR)
        }

    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get(TENSOR):
                continue
            value = getattr(self, f.name)
            if isinstance(value, dict):
                out.update({f"{f.name}/{k}": np.asarray(v) for k, v in value.items()})
            elif value is not None:
                out[f.name] = np.asarray(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls.from_parts(data, {})

    @classmethod
    def from_parts(cls, data: dict[str, Any], tensors: dict[str, np.ndarray]) -> Self:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get(TENSOR):
                prefix = f.name + "/"
                nested = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                if f.name in tensors:
                    values[f.name] = tensors[f.name]
                elif nested:
                    values[f.name] = nested
            elif f.name in data:
                values[f.name] = data[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"a {cls.kind} record needs '{f.name}'")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


# --- what the roles send the experimenter -----------------------------------------------------


@dataclass
class Rejection:
    node: int
    reason: str


@dataclass
class RoundReport(Record):
    """The server, after each round (round 0: the initial model): the new global model and what
    the strategy saw. The experimenter evaluates the model; the server holds no test data."""

    kind: ClassVar[str] = "round"
    round: int
    arrays: dict[str, np.ndarray] = tensor_field(default_factory=dict)
    sent: int = 0  # training messages sent this round
    replied: list[int] = field(default_factory=list)  # node ids whose reply arrived
    aggregated: list[int] = field(default_factory=list)  # node ids whose reply was aggregated
    rejected: list[dict[str, Any]] = field(default_factory=list)  # Rejection as dicts
    clipped: list[int] = field(default_factory=list)  # node ids whose update was norm-clipped
    train: dict[str, float] = field(default_factory=dict)  # aggregated training metrics
    model_finite: bool = True
    elapsed: float = 0.0  # seconds since the ServerApp started
    device: str = "cpu"


@dataclass
class StatusReport(Record):
    """The server's own view of the run: running, finished, or failed (with the reason)."""

    kind: ClassVar[str] = "status"
    state: str
    message: str = ""


@dataclass
class SampleSet(Record):
    """A GAN attacker's generated images from a fixed noise batch (comparable across rounds)."""

    kind: ClassVar[str] = "samples"
    attacker: int
    round: int
    mode: str  # "active" | "passive"
    target: int
    fake: int
    images: np.ndarray | None = tensor_field(default=None)  # N x C x H x W in [-1, 1]
    turns: int = 0  # attacker turns so far
    device: str = "cpu"


@dataclass
class ReconstructionReport(Record):
    """A gradient-inversion result: what the attacker recovered from one observed update."""

    kind: ClassVar[str] = "reconstruction"
    threat: str  # "client" (adversarial client) | "server" (curious server)
    round: int
    attacker: int | None = None  # the adversarial client's participant index
    node: int | None = None  # the curious server: the node whose update it inverted
    attack: str = ""
    update: str = ""  # "fedsgd" | "fedavg"
    batch_size: int = 0
    local_steps: int = 1
    isolated: str = ""  # client threat: "exact" or "aggregate of K clients"
    update_norm: float | None = None
    images: np.ndarray | None = tensor_field(default=None)  # B x C x H x W in the data range
    labels: np.ndarray | None = tensor_field(default=None)
    loss_history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    iterations: int = 0
    evaluations: int | None = None  # gradient evaluations (forward + backward of the model)
    restart: int | None = None  # the chosen restart
    per_restart_loss: list[float] = field(default_factory=list)  # every restart's final loss
    per_restart_iterations: list[int] = field(default_factory=list)
    per_restart_evaluations: list[int] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)  # restarts that ended diverged
    stopped: str = ""  # why the search ended: "budget", "converged" or "callback"
    backward_seed: str = ""  # the dL/dlogits the attack's simulated client backpropagated
    error: str | None = None
    device: str = "cpu"


@dataclass
class NodeReport(Record):
    """A participant announces which Flower node it is, once per run, to the experimenter only
    (the server never learns who is who); it lets the report name participants, not node ids."""

    kind: ClassVar[str] = "node"
    participant: int
    node: int
    role: str = "honest"
    device: str = "cpu"


SENT_RECORDS: dict[str, type[Record]] = {
    cls.kind: cls
    for cls in (RoundReport, StatusReport, SampleSet, ReconstructionReport, NodeReport)
}


# --- what the experimenter writes (the run folder's .jsonl files) -----------------------------


@dataclass
class VictimCost:
    """What a GAN attacker's injected fakes cost the victim: target test images sent to the fake
    class, and the target class's accuracy."""

    attacker: int
    target: int
    fake: int
    to_fake: float
    target_accuracy: float


@dataclass
class RoundMetrics(Record):
    """One line of metrics.jsonl: the experimenter's evaluation of a round's global model."""

    kind: ClassVar[str] = "round-metrics"
    round: int
    time: float = 0.0
    test_accuracy: float | None = None
    victims: list[dict[str, Any]] = field(default_factory=list)  # VictimCost as dicts
    sent: int = 0
    participants: int = 0  # replies aggregated
    rejected: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)
    clipped: int = 0
    train_loss: float | None = None
    model_finite: bool = True
    extra: dict[str, float] = field(default_factory=dict)  # other aggregated training metrics

    @property
    def to_fake(self) -> float | None:
        """The first attacker's victim cost (the usual single-attacker case)."""
        return self.victims[0]["to_fake"] if self.victims else None


@dataclass
class GanScore(Record):
    """One line of attack.jsonl: a sample set scored against ground truth."""

    kind: ClassVar[str] = "gan-score"
    attacker: int | None
    round: int
    variant: str  # "active" | "passive" | "model-inversion"
    target: int
    success: bool = False
    error: str | None = None
    measures: dict[str, Any] = field(default_factory=dict)  # see fedleak.metrics.attack

    def get(self, key: str) -> Any:
        return self.measures.get(key)


@dataclass
class InversionScore(Record):
    """One line of inversion.jsonl: a reconstruction scored against the private batch."""

    kind: ClassVar[str] = "inversion-score"
    threat: str
    round: int
    source: str = ""  # the inbox file scored
    attacker: int | None = None
    node: int | None = None
    participant: int | None = None  # whose batch it matched (curious server: best match)
    attack: str = ""
    update: str = ""
    batch_size: int = 0
    local_steps: int = 1
    isolated: str = ""
    psnr: float | None = None
    ssim: float | None = None
    mse: float | None = None
    psnr_per_image: list[float] = field(default_factory=list)
    label_accuracy: float | None = None
    seconds: float = 0.0
    iterations: int = 0
    evaluations: int | None = None  # gradient evaluations (forward + backward of the model)
    restart: int | None = None  # the chosen restart
    per_restart_loss: list[float] = field(default_factory=list)  # every restart's final loss
    per_restart_iterations: list[int] = field(default_factory=list)
    per_restart_evaluations: list[int] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)  # restarts that ended diverged
    stopped: str = ""  # why the search ended: "budget", "converged" or "callback"
    backward_seed: str = ""  # the dL/dlogits the attack's simulated client backpropagated
    loss_final: float | None = None
    error: str | None = None
    device: str = "cpu"
