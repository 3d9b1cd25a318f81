"""Settings of an Ensembler experiment (``fedleak ensembler ...``): collaborative inference over
gRPC, its Table-1 baselines and the adversarial server's model-inversion attack. These settings
never travel through Flower."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from fedleak.settings.base import Section
from fedleak.settings.federation import Count, Device, NonNegativeFloat, PositiveFloat

DEFENSES = ("none", "shredder", "single", "dr-single", "dr-ensemble", "ensembler")
AtLeastTwo = Annotated[int, Field(ge=2)]


class EnsemblerData(Section):
    dataset: Literal["cifar10"] = "cifar10"
    root: str = ""  # "" = $FEDLEAK_DATA_ROOT, else ~/.cache/fedleak/data
    client_train: AtLeastTwo = 3000  # train-split images the client trains every model on
    aux: AtLeastTwo = 1000  # train-split images the attacker owns (same distribution)
    aux_overlap: bool = False  # true: the attacker holds the client's training images (paper)
    eval: AtLeastTwo = 800  # test-split images classified through the server (the victims)
    augment: bool = True  # random crop (pad 4) and horizontal flip while training


class EnsemblerTrain(Section):
    epochs: Count = 4  # stage 1 and every one-round baseline
    batch_size: Count = 64
    lr: PositiveFloat = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegativeFloat = 5e-4
    sigma: NonNegativeFloat = 0.1  # the fixed Gaussian noise after each head (Eq. 2)


class EnsemblerDefense(Section):
    num_nets: Count = 3  # N server nets
    selected: Count = 2  # P, picked secretly by the client (seeded)
    stage2_epochs: Count = 3
    lr: PositiveFloat = 0.05
    lambda_: Annotated[NonNegativeFloat, Field(alias="lambda")] = 1.0  # cosine penalty (Eq. 3)


class Baselines(Section):
    defenses: list[str] = list(DEFENSES)
    shredder_sigma: NonNegativeFloat = 0.5  # inference-time noise on the NONE model
    single_sigma: NonNegativeFloat = 1.0  # the large noise a single net is retrained with
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5  # DR-*: dropout where Ensembler selects

    @field_validator("defenses", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        # `--set baselines.defenses=none,ensembler` arrives as one string
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("defenses")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [d for d in names if d not in DEFENSES]
        if unknown or not names:
            raise ValueError(f"unknown {unknown} (known: {', '.join(DEFENSES)})")
        if "none" not in names:
            raise ValueError("must include 'none': accuracy changes are measured against NONE")
        return names


class EnsemblerAttack(Section):
    shadow_epochs: Count = 3
    decoder_epochs: Count = 8
    lr: PositiveFloat = 1e-3
    batch_size: Count = 64
    adaptive: bool = True  # also attack all N nets of Ensembler at once with a learned selector
    # shadows per variant (seeds seed, seed+1, ...); the one whose head and decoder best
    # re-encode the received features is used (cycle consistency)
    restarts: Count = 1
    # independent attackers (each with its own restarts) per variant; the table gives the mean
    # SSIM/PSNR over them and their sample standard deviation
    trials: Count = 1
    # Beyond the paper's attack (both 0 = the paper's): a BatchNorm-statistics prior from the
    # server nets, and aligning the shadow features' moments with the received features.
    bn_weight: NonNegativeFloat = 0.0
    align_weight: NonNegativeFloat = 0.0


class EnsemblerServe(Section):
    host: str = "127.0.0.1"
    batch_size: Count = 100  # images per request the client sends
    timeout: PositiveFloat = 120.0  # seconds per request
    startup_timeout: PositiveFloat = 120.0
    keep_recordings: bool = False  # recorded features are ~50 MB per defense


class EnsemblerSettings(Section):
    description: str = ""
    preset: str = ""
    seed: Annotated[int, Field(ge=0)] = 0
    threads: Count = 1  # torch CPU threads per process (shared, contended cores: 1 is fastest)
    device: Device = "cpu"  # "auto" trains and attacks on the GPU when there is one
    out_dir: str = "runs"
    cache: bool = True  # reuse trained bundles whose training settings match
    data: EnsemblerData = EnsemblerData()
    train: EnsemblerTrain = EnsemblerTrain()
    ensembler: EnsemblerDefense = EnsemblerDefense()
    baselines: Baselines = Baselines()
    attack: EnsemblerAttack = EnsemblerAttack()
    serve: EnsemblerServe = EnsemblerServe()

    @model_validator(mode="after")
    def _p_within_n(self) -> EnsemblerSettings:
        if self.ensembler.selected > self.ensembler.num_nets:
            raise ValueError("ensembler.selected (P) must be in 1..ensembler.num-nets (N)")
        return self
