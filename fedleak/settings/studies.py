"""Settings of the single-process studies (``fedleak study NAME``), one model per study.

Each study's preset (``fedleak/presets/studies/NAME.toml``) overrides these defaults; the study
module receives the validated model. Keys and ranges are checked here, before torch loads.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from fedleak.settings.base import Section
from fedleak.settings.federation import Count, NonNegativeFloat, PositiveFloat

Threads = Annotated[int, Field(ge=1)]
LeakageModel = Literal["lenet", "resnet18", "densenet121", "inception_v3"]


class StudySettings(Section):
    """What every study has: a one-line description and the seed ``torch.manual_seed`` gets."""

    description: str = ""
    preset: str = ""
    seed: Annotated[int, Field(ge=0)] = 0


# --- dlg-models -------------------------------------------------------------------------------


class DlgModelsData(Section):
    dataset: Literal["cifar10"] = "cifar10"
    split: Literal["train", "test"] = "test"
    root: str = ""  # "" = $FEDLEAK_DATA_ROOT
    indices: list[Annotated[int, Field(ge=0)]] = []  # explicit image indices; [] = drawn by seed
    images: Count = 3  # images drawn; each model attacks the first `models.<name>.images`


class DlgModelsAttack(Section):
    name: Literal["dlg", "idlg"] = "dlg"  # soft labels optimised jointly, or the closed form
    lbfgs_max_iter: Count = 20  # DLG's inner iterations per L-BFGS step
    converge_mse: PositiveFloat = 1e-3  # pixel MSE on [0, 1]; steps-to-converge = first below
    threads: Threads = 1


class LeakageModelSettings(Section):
    """Per model: image side, images attacked, L-BFGS steps, what the network is fed, BatchNorm
    mode ("train": batch statistics, as a training client), per-image time budget (0 = none)."""

    image_size: Annotated[int, Field(ge=8)] = 32
    images: Count = 1
    steps: Count = 300
    input: Literal["raw", "unit", "imagenet"] = "unit"
    bn: Literal["train", "eval"] = "train"
    max_seconds: NonNegativeFloat = 0.0


class DlgModelsList(Section):
    names: list[LeakageModel] = ["lenet", "resnet18", "densenet121", "inception_v3"]
    sigmoid: bool = True  # the slides' ReLU -> Sigmoid swap (LeNet has sigmoids already)
    paper_sizes: bool = False  # true: 32 / 224 / 224 / 299 from the slides' table (GPU-sized)
    lenet: LeakageModelSettings = LeakageModelSettings(images=3, steps=300)
    resnet18: LeakageModelSettings = LeakageModelSettings(images=2, steps=40, input="imagenet")
    densenet121: LeakageModelSettings = LeakageModelSettings(images=2, steps=20, input="imagenet")
    inception_v3: LeakageModelSettings = LeakageModelSettings(
        image_size=107, images=1, steps=6, input="imagenet"
    )


class DlgModelsSettings(StudySettings):
    data: DlgModelsData = DlgModelsData()
    attack: DlgModelsAttack = DlgModelsAttack()
    models: DlgModelsList = DlgModelsList()


# --- inversion-defenses -----------------------------------------------------------------------


class DefensesData(Section):
    dataset: Literal["cifar10"] = "cifar10"
    split: Literal["train", "test"] = "test"
    root: str = ""
    batches: Count = 2  # private batches per setting (the same images in every setting)


class DefensesAttack(Section):
    name: Literal["idlg", "dlg", "inverting-gradients"] = "idlg"
    steps: Count = 100  # L-BFGS steps (Adam iterations for inverting-gradients)
    distance: Literal["l2", "cosine"] = "l2"  # gradient distance except the clip axes' own
    restarts: Count = 1
    threads: Threads = 1


class DefensesSweep(Section):
    """One axis at a time from the undefended batch-1 baseline."""

    batch_sizes: list[Annotated[int, Field(ge=1)]] = [1, 2, 4, 8]
    topk: list[Annotated[float, Field(gt=0, le=1)]] = [0.4, 0.1, 0.01]
    noise: list[Annotated[float, Field(ge=0)]] = [1e-4, 1e-3, 1e-2, 1e-1]
    clip: list[Annotated[float, Field(gt=0)]] = [10.0, 1.0, 0.1]
    clip_distances: list[Literal["l2", "cosine"]] = ["l2", "cosine"]


class InversionDefensesSettings(StudySettings):
    data: DefensesData = DefensesData()
    attack: DefensesAttack = DefensesAttack()
    sweep: DefensesSweep = DefensesSweep()


# --- gias-vs-ig -------------------------------------------------------------------------------


class GiasData(Section):
    # "mnist": prior on the train split, victims from the test split;
    # "faces": prior on people 1-30, victims among people 31-40 (64x64)
    dataset: Literal["mnist", "faces"] = "mnist"
    root: str = ""
    images: Count = 8  # victims: the first image of each class in turn


class GiasModel(Section):
    seed: Annotated[int, Field(ge=0)] = 1234  # DLG's sigmoid LeNet, U(-0.5, 0.5) init, untrained


GiasMethod = Literal["ig", "gi-latent", "gias", "giml", "gias-untrained", "ig-long"]


class GiasAttack(Section):
    methods: list[GiasMethod] = ["ig", "gi-latent", "gias"]
    iterations: Count = 1000  # the same budget for every method (GIAS: both stages together)
    restarts: Count = 4  # random starts per method, batched; best by final cost
    latent_share: Annotated[float, Field(gt=0, lt=1)] = 0.5  # GIAS: share of the latent stage
    tv_weight: NonNegativeFloat = 1e-4
    ig_long_iterations: Count = 2000
    ig_lr: PositiveFloat = 0.1
    latent_lr: PositiveFloat = 0.03
    param_lr: PositiveFloat = 0.001
    eval_every: Count = 25  # PSNR of the attacker's current pick every N iterations (scoring)
    threads: Threads = 1


class GiasPrior(Section):
    steps: Count = 1200  # DCGAN training steps on the auxiliary data (cached on disk)
    widths: list[Annotated[int, Field(ge=1)]] = []  # [] = [128, 64, 32] (32x32) / +256 (64x64)
    latent_dim: Count = 100
    batch_size: Count = 64


class GimlSettings(Section):
    tasks: Count = 24  # observed FedSGD updates of other images (disjoint from the victims)
    meta_steps: Count = 48  # Reptile steps, one task each
    meta_lr: PositiveFloat = 1.0  # Reptile step size, annealed linearly to 0
    latent_iterations: Count = 150
    param_iterations: Count = 100


class GiasVsIgSettings(StudySettings):
    data: GiasData = GiasData()
    model: GiasModel = GiasModel()
    attack: GiasAttack = GiasAttack()
    prior: GiasPrior = GiasPrior()
    giml: GimlSettings = GimlSettings()


# --- batch-sizes ------------------------------------------------------------------------------


class BatchSizesData(Section):
    dataset: Literal["cifar10"] = "cifar10"
    split: Literal["train", "test"] = "test"
    root: str = ""
    batches: Count = 2  # private batches per batch size; every attack inverts the same ones


class BatchSizesModel(Section):
    seed: Annotated[int, Field(ge=0)] = 1234  # dlg-lenet's weights: one model for every batch


class BatchSizesAttack(Section):
    names: list[Literal["dlg", "idlg", "inverting-gradients"]] = [
        "dlg",
        "idlg",
        "inverting-gradients",
    ]
    batch_sizes: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [1, 2, 4, 8]
    lbfgs_steps: Count = 300  # DLG and iDLG: L-BFGS steps (20 inner iterations each)
    ig_iterations: Count = 4800  # Inverting Gradients: Adam iterations, its published budget
    restarts: Annotated[int, Field(ge=0)] = 0  # 0 = each attack's preset
    threads: Threads = 1


class BatchSizesSettings(StudySettings):
    data: BatchSizesData = BatchSizesData()
    model: BatchSizesModel = BatchSizesModel()
    attack: BatchSizesAttack = BatchSizesAttack()


# study name -> (settings model, the module that runs it)
STUDIES: dict[str, tuple[type[StudySettings], str]] = {
    "dlg-models": (DlgModelsSettings, "fedleak.studies.dlg_models"),
    "inversion-defenses": (InversionDefensesSettings, "fedleak.studies.defenses"),
    "gias-vs-ig": (GiasVsIgSettings, "fedleak.studies.gias_vs_ig"),
    "batch-sizes": (BatchSizesSettings, "fedleak.studies.batch_sizes"),
}
