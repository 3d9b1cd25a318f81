"""Selective parameter sharing of Shokri & Shmatikov (CCS'15), which Hitaj et al. attack.

A participant uploads only a fraction theta_u of its update: the largest-magnitude entries whose
magnitude is at least tau, clipped to [-gamma, gamma]. With record-level differential privacy the
selection and the released values go through the sparse vector technique with Laplace noise;
the per-parameter budget epsilon/c is split 8/9 for selection and 1/9 for release (Hitaj §9.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SELECT_SHARE = 8 / 9
RELEASE_SHARE = 1 / 9


def upload_count(num_params: int, theta_u: float) -> int:
    """c: how many entries of the update may be shared this turn."""
    return max(1, math.ceil(theta_u * num_params))


def clip(values: np.ndarray, gamma: float) -> np.ndarray:
    return np.clip(values, -gamma, gamma) if gamma > 0 else values


def select_upload(delta: np.ndarray, theta_u: float, tau: float, gamma: float) -> np.ndarray:
    """The shared update: top-c entries by |value| among those >= tau, clipped; zeros elsewhere."""
    flat = delta.ravel()
    magnitude = np.abs(flat)
    eligible = np.flatnonzero(magnitude >= tau) if tau > 0 else np.arange(flat.size)
    c = min(upload_count(flat.size, theta_u), eligible.size)
    out = np.zeros_like(flat)
    if c > 0:
        top = eligible[np.argpartition(-magnitude[eligible], c - 1)[:c]]
        out[top] = clip(flat[top], gamma)
    return out.reshape(delta.shape)


@dataclass(frozen=True)
class LaplaceScales:
    """Noise scales of the sparse vector technique for one parameter's budget epsilon/c."""

    threshold: float
    query: float
    release: float

    @classmethod
    def for_budget(cls, epsilon_per_param: float, gamma: float) -> LaplaceScales:
        if epsilon_per_param <= 0 or gamma <= 0:
            raise ValueError("DP needs epsilon/c > 0 and a clipping bound gamma > 0")
        sensitivity = 2 * gamma  # a clipped value lies in [-gamma, gamma]
        eps_select = SELECT_SHARE * epsilon_per_param
        eps_release = RELEASE_SHARE * epsilon_per_param
        # The selection budget is halved between the noisy threshold and the noisy queries.
        return cls(
            threshold=sensitivity / (eps_select / 2),
            query=2 * sensitivity / (eps_select / 2),
            release=sensitivity / eps_release,
        )


def dp_select_upload(
    delta: np.ndarray,
    theta_u: float,
    tau: float,
    gamma: float,
    epsilon_per_param: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Sparse vector technique: visit entries in random order, share the first c whose noisy
    clipped magnitude clears the noisy threshold, and release each with Laplace noise."""
    scales = LaplaceScales.for_budget(epsilon_per_param, gamma)
    flat = delta.ravel()
    c = upload_count(flat.size, theta_u)
    order = rng.permutation(flat.size)
    noisy_threshold = tau + rng.laplace(0.0, scales.threshold)
    noisy = np.abs(clip(flat[order], gamma)) + rng.laplace(0.0, scales.query, size=flat.size)
    chosen = order[np.flatnonzero(noisy >= noisy_threshold)[:c]]
    out = np.zeros_like(flat)
    out[chosen] = clip(flat[chosen] + rng.laplace(0.0, scales.release, size=chosen.size), gamma)
    return out.reshape(delta.shape)


def download_mask(
    update_counts: np.ndarray, theta_d: float, rng: np.random.Generator
) -> np.ndarray:
    """The theta_d fraction of parameters updated most often (Shokri's download criterion);
    ties, such as the all-zero counts of the first rounds, are broken at random."""
    n = update_counts.size
    k = max(1, math.ceil(theta_d * n))
    mask = np.zeros(n, dtype=bool)
    if k >= n:
        mask[:] = True
    else:
        keys = update_counts.astype(np.float64) + rng.random(n) * 0.5
        mask[np.argpartition(-keys, k - 1)[:k]] = True
    return mask.reshape(update_counts.shape)
