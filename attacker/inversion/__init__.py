"""Gradient-inversion attacks (DLG, iDLG, Inverting Gradients, GIAS, GIML) on FedSGD and FedAvg
updates.

The attacker sees an :class:`Observation` (model, update, declared metadata) and returns a
:class:`Reconstruction`; scoring against the private batch is ``fedleak.metrics.images``'s job.
"""

from fedleak.attacker.inversion.attacks import InversionConfig, OptimizationAttack, Reconstruction
from fedleak.attacker.inversion.generative import (
    GIAS,
    GenerativeAttack,
    GenerativeConfig,
    GenerativeReconstruction,
    LatentSearch,
)
from fedleak.attacker.inversion.giml import GIML, GIMLConfig, meta_learn_generator
from fedleak.attacker.inversion.labels import idlg_label, recover_labels
from fedleak.attacker.inversion.observation import Observation, fedavg_update, fedsgd_update
from fedleak.attacker.inversion.prior import train_dcgan_prior
from fedleak.attacker.inversion.registry import ATTACKS, get_attack

__all__ = [
    "ATTACKS",
    "GIAS",
    "GIML",
    "GIMLConfig",
    "GenerativeAttack",
    "GenerativeConfig",
    "GenerativeReconstruction",
    "LatentSearch",
    "InversionConfig",
    "Observation",
    "OptimizationAttack",
    "Reconstruction",
    "fedavg_update",
    "fedsgd_update",
    "get_attack",
    "idlg_label",
    "meta_learn_generator",
    "recover_labels",
    "train_dcgan_prior",
]
