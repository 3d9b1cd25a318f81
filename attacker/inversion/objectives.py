"""Gradient-matching distances and image priors, looked up by name.

Each distance compares one simulated update with the observed one, both lists of per-parameter
tensors; attacks ``vmap`` them over restarts, so they must stay free of data-dependent control
flow and in-place updates.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

_TINY = 1e-30  # keeps sqrt's derivative finite when a simulated gradient vanishes


class L2Distance:
    """DLG's objective: squared Euclidean distance, summed over all parameters."""

    def __call__(self, simulated: Sequence[Tensor], observed: Sequence[Tensor]) -> Tensor:
        return sum((s - o).pow(2).sum() for s, o in zip(simulated, observed, strict=True))


class CosineDistance:
    """Geiping et al.'s objective: ``1 - cos`` between the whole updates (0 = same direction).

    Dot product and norms are sums over all layers, i.e. one cosine of the concatenated update,
    as in "Inverting Gradients" (NeurIPS'20). Invariant to the update's scale, so an unknown
    learning rate, number of local steps or aggregation weight does not matter; only direction
    is matched.
    """

    def __call__(self, simulated: Sequence[Tensor], observed: Sequence[Tensor]) -> Tensor:
        dot = sum((s * o).sum() for s, o in zip(simulated, observed, strict=True))
        sim_sq = sum(s.pow(2).sum() for s in simulated)
        obs_sq = sum(o.pow(2).sum() for o in observed)
        return 1 - dot / (sim_sq.clamp_min(_TINY).sqrt() * obs_sq.clamp_min(_TINY).sqrt())


class TotalVariation:
    """Anisotropic total variation: mean |difference| of horizontal plus vertical neighbours.

    Works on any ``...xHxW`` tensor (one image, a batch, or restarts of batches); natural images
    have small TV, the noise gradient matching leaves behind has large TV.
    """

    def __call__(self, images: Tensor) -> Tensor:
        dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
        dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
        return dx + dy


DISTANCES: dict[str, type] = {"l2": L2Distance, "cosine": CosineDistance}
PRIORS: dict[str, type] = {"tv": TotalVariation}


def get_distance(name: str) -> L2Distance | CosineDistance:
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r} (known: {', '.join(sorted(DISTANCES))})")
    return DISTANCES[name]()


def get_prior(name: str) -> TotalVariation:
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r} (known: {', '.join(sorted(PRIORS))})")
    return PRIORS[name]()


def total_variation(images: Tensor) -> Tensor:
    return TotalVariation()(images)


__all__ = [
    "DISTANCES",
    "PRIORS",
    "CosineDistance",
    "L2Distance",
    "TotalVariation",
    "get_distance",
    "get_prior",
    "total_variation",
]
