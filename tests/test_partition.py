"""Client partitioners: coverage, disjointness, skew and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from fedleak.data import by_labels, dirichlet, iid, parse_classes
from fedleak.errors import ConfigError

LABELS = np.random.default_rng(0).integers(0, 10, size=3000)


def _assert_sorted_int64(parts):
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)


def test_by_labels_with_overlapping_sets():
    labels = np.array([0, 1, 2, 1, 0, 3, 2])
    victim, attacker, empty = by_labels(labels, [[0, 1], [1, 2], []])
    assert victim.tolist() == [0, 1, 3, 4]
    assert attacker.tolist() == [1, 2, 3, 6]
    assert empty.dtype == np.int64 and empty.size == 0
    assert set(victim) & set(attacker) == {1, 3}  # shared class 1 lands in both


def test_by_labels_takes_exactly_the_listed_classes():
    parts = by_labels(LABELS, [[3], [5, 7]])
    _assert_sorted_int64(parts)
    assert set(LABELS[parts[1]]) == {5, 7}
    assert parts[1].size == np.isin(LABELS, [5, 7]).sum()
    assert np.array_equal(parts[0], np.flatnonzero(LABELS == 3))


def test_by_labels_rejects_bad_input():
    with pytest.raises(ConfigError):
        by_labels(LABELS, [[-1]])
    with pytest.raises(ConfigError):
        by_labels(np.array([0, -2]), [[0]])
    with pytest.raises(ConfigError):
        by_labels(np.zeros((2, 2), dtype=int), [[0]])


def test_iid_covers_everything_once():
    parts = iid(103, 4, seed=1)
    _assert_sorted_int64(parts)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    # Shuffled, not contiguous blocks.
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))


def test_iid_is_deterministic_per_seed():
    a, b, c = iid(500, 3, seed=7), iid(500, 3, seed=7), iid(500, 3, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_validates():
    with pytest.raises(ConfigError, match="num_parts"):
        iid(10, 0, seed=0)
    with pytest.raises(ConfigError):
        iid(2, 3, seed=0)


@pytest.mark.parametrize(("alpha", "parts", "min_size"), [(0.1, 5, 10), (1.0, 10, 50), (100, 3, 1)])
def test_dirichlet_disjoint_covering_min_size(alpha, parts, min_size):
    split = dirichlet(LABELS, parts, alpha, seed=3, min_size=min_size)
    assert len(split) == parts
    _assert_sorted_int64(split)
    everything = np.concatenate(split)
    assert everything.size == LABELS.size  # disjoint ...
    assert np.array_equal(np.sort(everything), np.arange(LABELS.size))  # ... and covering
    assert min(len(p) for p in split) >= min_size


def _mean_label_entropy(parts) -> float:
    """Mean entropy (nats) of each part's label distribution: low means skewed parts."""
    out = []
    for p in parts:
        freq = np.bincount(LABELS[p], minlength=10) / len(p)
        freq = freq[freq > 0]
        out.append(-(freq * np.log(freq)).sum())
    return float(np.mean(out))


def test_smaller_alpha_gives_more_skewed_parts():
    skewed = np.mean([_mean_label_entropy(dirichlet(LABELS, 5, 0.1, seed=s)) for s in range(5)])
    mild = np.mean([_mean_label_entropy(dirichlet(LABELS, 5, 1.0, seed=s)) for s in range(5)])
    flat = np.mean([_mean_label_entropy(dirichlet(LABELS, 5, 1000, seed=s)) for s in range(5)])
    assert skewed < mild < flat
    assert flat > 0.98 * np.log(10)  # near uniform for huge alpha
    assert skewed < 0.6 * np.log(10)


def test_dirichlet_is_deterministic_per_seed():
    a, b = dirichlet(LABELS, 4, 0.5, seed=11), dirichlet(LABELS, 4, 0.5, seed=11)
    c = dirichlet(LABELS, 4, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_validates():
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet(LABELS, 3, 0.0, seed=0)
    with pytest.raises(ConfigError, match="num_parts"):
        dirichlet(LABELS, 0, 1.0, seed=0)
    with pytest.raises(ConfigError):
        dirichlet(np.array([0, 1, -1]), 2, 1.0, seed=0)
    with pytest.raises(ConfigError, match="at least"):
        dirichlet(LABELS, 10, 1.0, seed=0, min_size=301)  # 10 * 301 > 3000
    # Feasible in principle, but a strongly skewed draw essentially never satisfies it.
    with pytest.raises(ConfigError, match="tries"):
        dirichlet(np.zeros(100, dtype=int), 10, 0.01, seed=0, min_size=10)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0,1,2", [0, 1, 2]),
        ("0-4", [0, 1, 2, 3, 4]),
        ("0-4,7", [0, 1, 2, 3, 4, 7]),
        (" 7, 2-3 ,2 ", [2, 3, 7]),
        ("5", [5]),
        ("", []),
        ([1, 2], [1, 2]),
        ((3, 1, 3), [1, 3]),
        (np.array([4, 0]), [0, 4]),
        ([], []),
    ],
)
def test_parse_classes(spec, expected):
    assert parse_classes(spec) == expected


@pytest.mark.parametrize("spec", ["a", "1-", "3-1", "1,,2", "-1", "1.5", [1, -1], [True], 3])
def test_parse_classes_rejects_bad_specs(spec):
    with pytest.raises(ConfigError, match="bad class spec"):
        parse_classes(spec)
