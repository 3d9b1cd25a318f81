"""Gradient-inversion settings, one type for both threat models.

The adversarial client (``[attack]``) and the curious server (``[server]``) run the same attacks
with the same keys, so both sections inherit them from :class:`InversionSettings` and presets keep
their flat spelling (``inversion = "idlg"``, ``inversion-restarts = 4``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from fedleak.settings.base import Section, suggestion

# The registry names of attacks that can run inside the federation (attacker.inversion.ATTACKS;
# tests/test_settings.py keeps the two in step). The generative-prior attacks need a prior trained
# for the dataset: they run in the gias-vs-ig study, not inside the federation.
FEDERATED_ATTACKS = ("dlg", "idlg", "inverting-gradients")
PRIOR_ATTACKS = ("gias", "gi-latent", "giml")


class InversionSettings(Section):
    inversion: str = "idlg"  # the attack, a registry name
    inversion_iterations: Annotated[int, Field(ge=0)] = 0  # 0 = the attack preset's own budget
    inversion_restarts: Annotated[int, Field(ge=0)] = 0  # 0 = the attack preset's own number
    inversion_rounds: Annotated[int, Field(ge=1)] = 1  # invert the updates of the first N rounds

    @field_validator("inversion")
    @classmethod
    def _known_attack(cls, name: str) -> str:
        if name in FEDERATED_ATTACKS:
            return name
        usable = f"usable in the federation: {', '.join(FEDERATED_ATTACKS)}"
        if name in PRIOR_ATTACKS:
            raise ValueError(f"{name!r} needs a generative prior ({usable})")
        raise ValueError(
            f"unknown attack {name!r}{suggestion(name, list(FEDERATED_ATTACKS))} ({usable})"
        )
