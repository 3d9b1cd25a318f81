"""Attacks by name: each name is one paper's preset, overridable per call.

The generative-prior attacks (``gias``, ``gi-latent``, ``giml``) also take the generator:
``get_attack("gias", prior=G, latent_iterations=500)``.
"""

from __future__ import annotations

from fedleak.attacker.inversion.attacks import DLG, IDLG, InvertingGradients, OptimizationAttack
from fedleak.attacker.inversion.generative import GIAS, GenerativeAttack, LatentSearch
from fedleak.attacker.inversion.giml import GIML

ATTACKS: dict[str, type[OptimizationAttack] | type[GenerativeAttack]] = {
    cls.name: cls for cls in (DLG, IDLG, InvertingGradients, GIAS, LatentSearch, GIML)
}


def get_attack(name: str, **overrides) -> OptimizationAttack | GenerativeAttack:
    """The attack ``name`` with its paper's hyper-parameters, any of them overridden.

    >>> get_attack("inverting-gradients", iterations=200, restarts=8).config.lr
    0.1
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r} (known: {', '.join(sorted(ATTACKS))})")
    return ATTACKS[name](**overrides)
