"""Gradient-inversion attacks (DLG, iDLG, Inverting Gradients) on FedSGD and FedAvg updates.

The attacker sees an :class:`Observation` (model, update, declared metadata) and returns a
:class:`Reconstruction`; scoring against the private batch is ``fedleak.metrics.images``'s job.
"""

from attacker.inversion.attacks import InversionConfig, OptimizationAttack, Reconstruction
from attacker.inversion.labels import idlg_label, recover_labels
from attacker.inversion.observation import Observation, fedavg_update, fedsgd_update
from attacker.inversion.registry import ATTACKS, get_attack

__all__ = [
    "ATTACKS",
    "InversionConfig",
    "Observation",
    "OptimizationAttack",
    "Reconstruction",
    "fedavg_update",
    "fedsgd_update",
    "get_attack",
    "idlg_label",
    "recover_labels",
]
