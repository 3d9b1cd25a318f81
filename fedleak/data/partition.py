"""Split a dataset's items between federated clients.

Pure numpy on index arrays so the same split can be recomputed in every client process from
(seed, labels) alone, without shipping data or index lists over the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedleak.errors import ConfigError
from fedleak.settings.classes import parse_classes

__all__ = ["by_labels", "dirichlet", "iid", "parse_classes"]

_MAX_DIRICHLET_TRIES = 100


def _labels_array(labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ConfigError(f"labels must be non-negative, found {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _check_parts(num_parts: int) -> None:
    if isinstance(num_parts, bool) or not isinstance(num_parts, int | np.integer) or num_parts < 1:
        raise ConfigError(f"num_parts must be an integer >= 1, got {num_parts!r}")


def by_labels(labels, label_sets: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Class-based split of the paper's setup; sets may overlap, so parts may share items."""
    arr = _labels_array(labels)
    parts = []
    for classes in label_sets:
        wanted = [int(c) for c in classes]
        if any(c < 0 for c in wanted):
            raise ConfigError(f"class ids must be non-negative, got {list(classes)}")
        parts.append(np.flatnonzero(np.isin(arr, wanted)).astype(np.int64))
    return parts


def iid(num_items: int, num_parts: int, seed: int) -> list[np.ndarray]:
    """Uniform random split: the no-skew baseline against which attacks are compared."""
    _check_parts(num_parts)
    if num_items < num_parts:
        raise ConfigError(f"cannot split {num_items} items into {num_parts} non-empty parts")
    perm = np.random.default_rng(seed).permutation(num_items)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_parts)]


def dirichlet(
    labels, num_parts: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019): small alpha concentrates each class on few parts.

    Resampling rather than patching small parts keeps the Dirichlet statistics intact.
    """
    arr = _labels_array(labels)
    _check_parts(num_parts)
    if not alpha > 0:
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha!r}")
    if min_size < 0 or num_parts * min_size > arr.size:
        raise ConfigError(
            f"cannot give {num_parts} parts at least {min_size} of {arr.size} items each"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(arr == c) for c in np.unique(arr)]
    for _ in range(_MAX_DIRICHLET_TRIES):
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(num_parts, float(alpha)))
            cuts = (np.cumsum(share)[:-1] * idx.size).astype(np.int64)
            for part, piece in zip(chunks, np.split(idx, cuts), strict=True):
                part.append(piece)
        parts = [
            np.sort(np.concatenate(c)).astype(np.int64) if c else np.empty(0, np.int64)
            for c in chunks
        ]
        if min(p.size for p in parts) >= min_size:
            return parts
    raise ConfigError(
        f"dirichlet split with alpha={alpha} left a part with fewer than "
        f"{min_size} items after {_MAX_DIRICHLET_TRIES} tries; "
        "raise alpha or lower the number of parts"
    )
