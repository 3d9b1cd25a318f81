"""Attacks by name: each name is one paper's preset, overridable per call."""

from __future__ import annotations

from attacker.inversion.attacks import DLG, IDLG, InvertingGradients, OptimizationAttack

ATTACKS: dict[str, type[OptimizationAttack]] = {
    cls.name: cls for cls in (DLG, IDLG, InvertingGradients)
}


def get_attack(name: str, **overrides) -> OptimizationAttack:
    """The attack ``name`` with its paper's hyper-parameters, any of them overridden.

    >>> get_attack("inverting-gradients", iterations=200, restarts=8).config.lr
    0.1
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r} (known: {', '.join(sorted(ATTACKS))})")
    return ATTACKS[name](**overrides)
