"""Update defenses: pure functions on a client's update, a list of per-parameter tensors.

Each defense returns new tensors and never modifies its input. Definitions (``u_i`` is the
i-th tensor of the update, ``n_i`` its number of entries):

- ``topk(u, f)``: per tensor, keep the ``k_i = ceil(f * n_i)`` entries of largest magnitude and
  set the others to 0 (ties broken by ``torch.topk``); ``f = 1`` keeps everything. Per layer,
  not global, so a small layer (a bias) is never zeroed entirely.
- ``clip(u, C)``: global L2 norm ``N = sqrt(sum_i ||u_i||^2)`` over all tensors together; if
  ``N > C`` every tensor is scaled by ``C / N`` (the norm becomes C), otherwise nothing changes.
- ``noise(u, sigma)``: adds i.i.d. ``N(0, sigma^2)`` to every entry of every tensor.

``apply_defenses`` composes them in the order given: ``clip:1.0+noise:0.01`` clips, then adds
noise (the Gaussian mechanism of DP-SGD when sigma is a multiple of C). The same function can
serve a Flower client mod: turn the outgoing arrays into tensors, apply, send the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only where a defense is applied: settings parse specs without it
    import torch
    from torch import Tensor

KINDS = ("none", "topk", "noise", "clip")


@dataclass(frozen=True)
class DefenseSpec:
    """One defense and its strength: ``topk`` fraction kept, ``noise`` sigma, ``clip`` bound."""

    kind: str
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown defense {self.kind!r} (known: {', '.join(KINDS)})")
        if not math.isfinite(self.value):
            raise ValueError(f"{self.kind}: the value must be finite, got {self.value}")
        if self.kind == "topk" and not 0.0 < self.value <= 1.0:
            raise ValueError(f"topk keeps a fraction in (0, 1], got {self.value}")
        if self.kind == "noise" and self.value < 0.0:
            raise ValueError(f"noise sigma must be >= 0, got {self.value}")
        if self.kind == "clip" and self.value <= 0.0:
            raise ValueError(f"clip bound must be > 0, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> DefenseSpec:
        """``"none"``, ``"topk:0.1"``, ``"noise:0.01"`` or ``"clip:1.0"``."""
        text = text.strip()
        if text == "none":
            return cls("none")
        kind, sep, raw = text.partition(":")
        if not sep or kind not in KINDS or kind == "none":
            raise ValueError(
                f"bad defense {text!r}: use none, topk:FRACTION, noise:SIGMA or clip:BOUND"
            )
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"bad defense {text!r}: {raw!r} is not a number") from None
        return cls(kind, value)

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.value:g}"


def parse_defenses(text: str | Sequence[str] | Sequence[DefenseSpec]) -> list[DefenseSpec]:
    """A chain such as ``"clip:1.0+noise:0.01"`` (or a list of specs) in application order."""
    items = text.split("+") if isinstance(text, str) else list(text)
    specs = [s if isinstance(s, DefenseSpec) else DefenseSpec.parse(s) for s in items]
    return [s for s in specs if s.kind != "none"]


def topk(update: Sequence[Tensor], fraction: float) -> list[Tensor]:
    """Keep the ``ceil(fraction * n)`` largest-magnitude entries of each tensor, zero the rest."""
    import torch

    out = []
    for u in update:
        k = math.ceil(fraction * u.numel())
        if k >= u.numel():
            out.append(u.clone())
            continue
        flat = u.flatten()
        keep = flat.abs().topk(k).indices
        sparse = torch.zeros_like(flat)
        sparse[keep] = flat[keep]
        out.append(sparse.view_as(u))
    return out


def global_norm(update: Sequence[Tensor]) -> Tensor:
    """L2 norm of all tensors concatenated."""
    import torch

    return torch.sqrt(sum(u.double().pow(2).sum() for u in update))


def clip(update: Sequence[Tensor], bound: float) -> list[Tensor]:
    """Scale the whole update to global L2 norm ``bound`` if it is larger; else unchanged."""
    norm = float(global_norm(update))
    scale = bound / norm if norm > bound else 1.0
    return [u * scale for u in update]


def gaussian_noise(
    update: Sequence[Tensor], sigma: float, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Add i.i.d. N(0, sigma^2) to every entry (drawn on the generator's device, then moved)."""
    import torch

    if sigma == 0:
        return [u.clone() for u in update]
    device = generator.device if generator is not None else torch.device("cpu")
    return [
        u + sigma * torch.randn(u.shape, generator=generator, device=device).to(u) for u in update
    ]


def apply_defenses(
    update: Sequence[Tensor],
    specs: str | Sequence[str] | Sequence[DefenseSpec],
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Apply the defenses in ``specs`` one after another (see the module docstring)."""
    chain = parse_defenses(specs)
    out = [u.detach().clone() for u in update]  # never hand back the caller's own tensors
    for spec in chain:
        if spec.kind == "topk":
            out = topk(out, spec.value)
        elif spec.kind == "clip":
            out = clip(out, spec.value)
        elif spec.kind == "noise":
            out = gaussian_noise(out, spec.value, generator)
    return out
