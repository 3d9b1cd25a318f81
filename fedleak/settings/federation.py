"""Settings of a federated run (``fedleak run``): one typed model, every key with its default
and its valid range. A preset (TOML) and ``--set section.key=value`` override the defaults.

Hyper-parameter defaults are Hitaj et al. (CCS'17) §8.4. ``fedleak config PRESET`` prints the
resolved settings with these comments' descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from fedleak.errors import ConfigError
from fedleak.settings.base import Section
from fedleak.settings.classes import format_classes, parse_classes
from fedleak.settings.inversion import InversionSettings

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Count = Annotated[int, Field(ge=1)]
Port = Annotated[int, Field(ge=0, le=65535)]  # 0 = pick a free port

# model name -> the dataset it is built for (fedleak.models.MODELS; tests keep them in step)
MODEL_DATASETS = {"hitaj-mnist": "mnist", "hitaj-faces": "faces", "dlg-lenet": "cifar10"}
Engine = Literal["simulation", "deployment"]
ProtocolName = Literal["collaborative", "fedavg", "fedsgd"]
Device = Literal["auto", "cpu", "cuda"]


class RunSettings(Section):
    seed: Annotated[int, Field(ge=0)] = 0
    rounds: Count = 40
    engine: Engine = "simulation"  # Flower's Simulation Engine | SuperLink + SuperNodes
    protocol: ProtocolName = "collaborative"  # Shokri & Shmatikov (one participant a round) | ...
    round_timeout: PositiveFloat = 300.0  # seconds the server waits for a round's replies
    startup_timeout: PositiveFloat = 180.0  # seconds to wait for every SuperNode to connect
    max_wall_time: PositiveFloat = 3600.0  # the launcher stops a run that takes longer
    max_empty_rounds: Count = 3  # this many rounds in a row aggregating nobody fail the run
    device: Device = "auto"  # where roles train and attack: the GPU when there is one ("auto")
    out_dir: str = "runs"


class DataSettings(Section):
    dataset: Literal["mnist", "faces", "cifar10"] = "mnist"
    root: str = ""  # "" = $FEDLEAK_DATA_ROOT, else ~/.cache/fedleak/data
    download: bool = False  # allow torchvision downloads into the data root
    partition: Literal["labels", "iid", "dirichlet"] = "labels"
    alpha: PositiveFloat = 0.5  # Dirichlet concentration


class ModelSettings(Section):
    name: Literal["hitaj-mnist", "hitaj-faces", "dlg-lenet"] = "hitaj-mnist"
    num_classes: Annotated[int, Field(ge=2)] = 11  # real classes + the attacker's fake class


class TrainSettings(Section):
    """The agreed local training procedure, declared by the server every round."""

    lr: PositiveFloat = 0.001
    lr_decay: NonNegativeFloat = 1e-7  # Torch7 schedule: lr / (1 + step * decay)
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    batch_size: Count = 64
    local_batches: Count = 100  # SGD steps per participant turn
    # fedavg: > 0 = each round a client draws this many examples and runs local-batches steps over
    # them (chunks of batch-size, no shuffle); 0 = batches from the whole partition.
    # fedsgd: always one step on batch-size examples.
    examples_per_round: Annotated[int, Field(ge=0)] = 0


class ProtocolSettings(Section):
    """The collaborative protocol only (Shokri & Shmatikov, CCS'15)."""

    theta_d: Fraction = 1.0  # fraction of parameters downloaded per turn
    theta_u: Fraction = 1.0  # fraction of the update uploaded per turn
    tau: NonNegativeFloat = 0.0  # only update entries with |value| >= tau are uploaded
    gamma: NonNegativeFloat = 0.0  # clip uploaded values to [-gamma, gamma]; 0 = no clipping
    dp_epsilon: NonNegativeFloat = 0.0  # epsilon / c per uploaded parameter; 0 = no DP


class AttackSettings(InversionSettings):
    """The attackers' private settings: sent only to their own nodes."""

    gen_lr: PositiveFloat = 0.02  # generator SGD learning rate (paper: 0.02)
    gen_steps: Count = 20  # generator updates per attacker turn
    gen_batch: Count = 64
    fakes_per_batch: Annotated[int, Field(ge=0)] = 11  # generated images labelled fake per batch
    sample_every: Count = 2  # report generated samples every N attacker turns
    num_samples: Count = 100


class EvalSettings(Section):
    """The testbed's own measurement; never shown to the federation's roles. What is attacked
    comes from the attackers' settings: target-class / fake-class here may only repeat them."""

    target_class: Annotated[int, Field(ge=0)] | None = None
    fake_class: Annotated[int, Field(ge=0)] | None = None
    # median nearest-real L2 distance (32x32, [-1, 1]) above which samples are not images; <= 0 off
    realism_threshold: float = 15.0
    model_inversion: bool = True  # Fredrikson et al. model inversion of the final model, baseline
    mi_steps: Count = 300
    mi_lr: PositiveFloat = 0.05


class ServerSettings(InversionSettings):
    curious: bool = False  # a curious server also inverts every individual update it receives
    # Replies are checked against what the server declared; these bound what it cannot derive.
    max_examples: Count = 60_000  # the largest example count a reply may declare
    update_norm_bound: NonNegativeFloat = 0.0  # > 0: clip each update to this L2 norm (reported)


class DefenseSettings(Section):
    """Applied to the honest clients' updates (fedavg / fedsgd)."""

    client: str = "none"  # update transforms in order, e.g. "clip:1.0+noise:0.001" or "topk:0.1"
    local_dp_epsilon: NonNegativeFloat = 0.0  # > 0: Flower's LocalDpMod
    local_dp_delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    local_dp_clip: PositiveFloat = 1.0
    server_dp_noise: NonNegativeFloat = 0.0  # > 0: DifferentialPrivacyServerSideFixedClipping
    server_dp_clip: PositiveFloat = 1.0

    @field_validator("client")
    @classmethod
    def _parses(cls, text: str) -> str:
        from fedleak.defenses import parse_defenses

        parse_defenses(text)  # raises ValueError with the reason
        return text

    @property
    def used(self) -> bool:
        return self.client != "none" or self.local_dp_epsilon > 0 or self.server_dp_noise > 0


class DeploymentSettings(Section):
    superlink_port: Port = 0
    node_ports: Port = 0  # first SuperNode port; 0 = free ports
    collector: str = ""  # host:port where roles report to the experimenter (set by the launcher)
    # where participants' node-local folders go when their entry names none:
    # <node-root>/<index>-<role>/ (and .../state); set by the launcher for local runs
    node_root: str = ""


class SimulationSettings(Section):
    backend_cpus: Count = 2  # CPUs Ray may use
    client_cpus: Count = 1  # CPUs per virtual ClientApp


# GAN variants, gradient inversion, and a participant that lies in its replies
AttackMode = Literal["active", "passive", "inversion", "byzantine"]
Lie = Literal[
    "zero-examples",
    "negative-examples",
    "nan-examples",
    "inf-examples",
    "huge-examples",
    "fractional-examples",
    "nan-weights",
    "float64-overflow",
    "int-weights",
    "bool-weights",
    "wrong-shape",
    "huge-update",
    "missing-metrics",
    "extra-records",
]


class ParticipantEntry(Section):
    """One ``[[participants]]`` table: a participant, or a group of ``count`` identical ones."""

    role: Literal["honest", "attacker"]
    classes: str = ""  # "0-4,7": the classes the participant holds (partition = "labels")
    count: Count = 1
    # A group: member k takes the k-th run of this many classes from `classes` (0 = all of them).
    classes_per_member: Annotated[int, Field(ge=0)] = 0
    mode: AttackMode | None = None  # attackers: default "active"
    target_class: Annotated[int, Field(ge=0)] | None = None  # GAN attackers: the victim's class
    fake_class: Annotated[int, Field(ge=0)] | None = None  # default: the last class
    lie: Lie | None = None  # byzantine attackers: how their replies break the protocol
    state_dir: str = ""  # node-local state (the generator); set by the launcher if empty
    out_dir: str = ""  # node-local outputs; set by the launcher if empty

    @field_validator("classes", mode="before")
    @classmethod
    def _canonical_classes(cls, value: object) -> object:
        if not isinstance(value, str | list):
            return value  # the type check reports it
        try:
            return format_classes(parse_classes(value))
        except ConfigError as err:  # pydantic reports ValueErrors with the key's name
            raise ValueError(str(err)) from None

    @model_validator(mode="after")
    def _attack_keys_on_attackers_only(self) -> ParticipantEntry:
        if self.role == "honest":
            for key in ("mode", "target_class", "fake_class", "lie"):
                if getattr(self, key) is not None:
                    raise ValueError(f"'{key.replace('_', '-')}' is for attackers, not honest ones")
        elif self.count != 1:
            raise ValueError("a group (count > 1) is for honest participants")
        elif self.mode in ("inversion", "byzantine") and (
            self.target_class,
            self.fake_class,
        ) != (None, None):
            raise ValueError("target-class / fake-class are for GAN attackers")
        if (self.mode == "byzantine") != (self.lie is not None):
            raise ValueError("a byzantine attacker needs a 'lie', and only it has one")
        return self


class ParticipantSpec(Section):
    """What one node is told about itself: its own entry, expanded from groups, with its index.
    Built once by the launcher; a node reads it back from its node config."""

    index: Annotated[int, Field(ge=0)]
    role: Literal["honest", "attacker"]
    classes: str = ""
    mode: AttackMode | None = None
    target_class: Annotated[int, Field(ge=0)] | None = None
    fake_class: Annotated[int, Field(ge=0)] | None = None
    lie: Lie | None = None
    state_dir: str = ""
    out_dir: str = ""

    @model_validator(mode="after")
    def _attackers_default_to_active(self) -> ParticipantSpec:
        if self.role == "attacker" and self.mode is None:  # a hand-written node config
            self.mode = "active"
        return self

    @property
    def is_attacker(self) -> bool:
        return self.role == "attacker"

    @property
    def class_list(self) -> list[int]:
        return parse_classes(self.classes)

    @property
    def label(self) -> str:
        """How a person reads this participant: 'participant 1 (attacker, active GAN)'."""
        what = {"active": "active GAN", "passive": "passive GAN", "inversion": "inversion"}
        what["byzantine"] = f"byzantine: {self.lie}"
        kind = f"attacker, {what[self.mode]}" if self.is_attacker and self.mode else self.role
        return f"participant {self.index} ({kind})"


@dataclass(frozen=True)
class Target:
    """What one GAN attacker attacks: the victim's class and the fake class it injects."""

    attacker: int
    target: int
    fake: int


class FederationSettings(Section):
    description: str = ""
    preset: str = ""  # the preset's name or file; set by the loader
    run: RunSettings = RunSettings()
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    protocol: ProtocolSettings = ProtocolSettings()
    attack: AttackSettings = AttackSettings()
    eval: EvalSettings = EvalSettings()
    server: ServerSettings = ServerSettings()
    defense: DefenseSettings = DefenseSettings()
    deployment: DeploymentSettings = DeploymentSettings()
    simulation: SimulationSettings = SimulationSettings()
    participants: Annotated[list[ParticipantEntry], Field(min_length=1)]

    # --- derived views ---------------------------------------------------------------------

    def specs(self) -> list[ParticipantSpec]:
        """Every participant, groups expanded, in index order."""
        out: list[ParticipantSpec] = []
        for entry in self.participants:
            classes = parse_classes(entry.classes)
            per = entry.classes_per_member
            for member in range(entry.count):
                mine = classes[member * per : (member + 1) * per] if per else classes
                attacker = entry.role == "attacker"
                out.append(
                    ParticipantSpec(
                        index=len(out),
                        role=entry.role,
                        classes=format_classes(mine),
                        mode=(entry.mode or "active") if attacker else None,
                        target_class=entry.target_class,
                        fake_class=self._fake(entry) if attacker else None,
                        lie=entry.lie,
                        **self._node_folders(entry, len(out)),
                    )
                )
        return out

    def _node_folders(self, entry: ParticipantEntry, index: int) -> dict[str, str]:
        out_dir = entry.out_dir
        if not out_dir and self.deployment.node_root:
            out_dir = f"{self.deployment.node_root}/{index}-{entry.role}"
        state_dir = entry.state_dir or (f"{out_dir}/state" if out_dir else "")
        return {"out_dir": out_dir, "state_dir": state_dir}

    @property
    def num_participants(self) -> int:
        return sum(entry.count for entry in self.participants)

    def _fake(self, entry: ParticipantEntry) -> int | None:
        if entry.mode in ("inversion", "byzantine"):
            return None
        return entry.fake_class if entry.fake_class is not None else self.model.num_classes - 1

    def gan_targets(self) -> list[Target]:
        """One per GAN attacker (active or passive): what the evaluation scores it on."""
        return [
            Target(s.index, s.target_class, s.fake_class)
            for s in self.specs()
            if s.is_attacker and s.mode in ("active", "passive") and s.target_class is not None
        ]

    @property
    def inverting(self) -> bool:
        return self.server.curious or any(s.mode == "inversion" for s in self.specs())

    # --- checks across sections ------------------------------------------------------------

    @model_validator(mode="after")
    def _consistent(self) -> FederationSettings:
        dataset = MODEL_DATASETS[self.model.name]
        if dataset != self.data.dataset:
            raise ValueError(
                f"model.name {self.model.name!r} is for {dataset}, not data.dataset "
                f"{self.data.dataset!r}"
            )
        if self.protocol.dp_epsilon > 0 and self.protocol.gamma <= 0:
            raise ValueError("protocol.dp-epsilon needs protocol.gamma > 0 (it bounds sensitivity)")
        self._check_participants()
        self._check_targets()
        if self.inverting:
            self._check_inversion()
        if self.defense.used and self.run.protocol == "collaborative":
            raise ValueError(
                "the defense.* settings apply to fedavg/fedsgd (collaborative has its own)"
            )
        return self

    def _check_participants(self) -> None:
        k = self.model.num_classes
        for i, entry in enumerate(self.participants):
            where = f"participants.{i}"
            classes = entry.classes
            listed = parse_classes(classes)
            if any(c >= k for c in listed):
                raise ValueError(f"{where}.classes {classes!r} outside 0..{k - 1}")
            if entry.classes_per_member and entry.classes_per_member * entry.count > len(listed):
                raise ValueError(
                    f"{where}: {entry.count} members x classes-per-member "
                    f"{entry.classes_per_member} need {entry.count * entry.classes_per_member} "
                    f"classes, `classes` lists {len(listed)}"
                )
            if entry.role != "attacker" or entry.mode in ("inversion", "byzantine"):
                continue
            if entry.target_class is None:
                raise ValueError(f"{where}.target-class: a GAN attacker needs the victim's class")
            for key in ("target_class", "fake_class"):
                value = getattr(entry, key)
                if value is not None and value >= k:
                    name = key.replace("_", "-")
                    raise ValueError(f"{where}.{name} = {value} outside 0..{k - 1}")

    def _check_targets(self) -> None:
        """eval.target-class / fake-class may only repeat what the attackers attack."""
        targets = self.gan_targets()
        for key, picked in (("target-class", "target"), ("fake-class", "fake")):
            value = getattr(self.eval, key.replace("-", "_"))
            if value is None:
                continue
            if not targets:
                raise ValueError(f"eval.{key} is set but no GAN attacker attacks a class")
            differ = [t for t in targets if getattr(t, picked) != value]
            if differ:
                t = differ[0]
                raise ValueError(
                    f"eval.{key} = {value} but participant {t.attacker}'s {key} is "
                    f"{getattr(t, picked)}: the evaluation follows the attacker; set "
                    f"participants.<i>.{key} only"
                )

    def _check_inversion(self) -> None:
        """Gradient inversion needs updates it can model: plain SGD steps on a known batch."""
        if self.run.protocol == "collaborative":
            raise ValueError("gradient inversion runs on the fedsgd or fedavg protocol")
        if self.run.protocol == "fedavg" and self.train.examples_per_round < 1:
            raise ValueError("gradient inversion on fedavg needs train.examples-per-round > 0")
        if self.train.momentum != 0 or self.train.lr_decay != 0:
            raise ValueError(
                "gradient inversion assumes plain SGD: train.momentum = train.lr-decay = 0"
            )
