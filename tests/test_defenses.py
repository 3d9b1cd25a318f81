"""Update defenses change an update exactly as documented in clients/defenses.py."""

from __future__ import annotations

import math

import pytest
import torch

from fedleak.defenses import (
    DefenseSpec,
    apply_defenses,
    clip,
    gaussian_noise,
    global_norm,
    parse_defenses,
    topk,
)


def update(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(12, 3, 5, 5, generator=g),
        torch.randn(12, generator=g),
        torch.randn(7, generator=g),
    ]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.4, 1.0])
def test_topk_keeps_exactly_the_k_largest_per_layer(fraction):
    original = update()
    sparse = topk(original, fraction)
    for u, s in zip(original, sparse, strict=True):
        k = math.ceil(fraction * u.numel())
        kept = s != 0
        assert int(kept.sum()) == k
        assert torch.equal(s[kept], u[kept])  # kept entries are untouched
        # Every kept magnitude is at least every dropped one.
        if k < u.numel():
            assert u[kept].abs().min() >= u[~kept].abs().max()
    assert all(torch.equal(a, b) for a, b in zip(original, update(), strict=True))  # no mutation


def test_topk_small_fraction_still_keeps_one_entry_of_each_layer():
    sparse = topk([torch.tensor([0.1, -3.0, 2.0]), torch.tensor([5.0])], 0.01)
    assert sparse[0].tolist() == [0.0, -3.0, 0.0]
    assert sparse[1].tolist() == [5.0]


def test_clip_scales_to_the_bound_and_leaves_small_updates_alone():
    original = update()
    norm = float(global_norm(original))
    clipped = clip(original, norm / 4)
    assert float(global_norm(clipped)) == pytest.approx(norm / 4, rel=1e-6)
    for u, c in zip(original, clipped, strict=True):  # one common factor: the direction is kept
        assert torch.allclose(c, u / 4, atol=1e-6)
    untouched = clip(original, norm * 2)
    assert all(torch.equal(a, b) for a, b in zip(original, untouched, strict=True))


def test_noise_has_the_requested_std_and_is_seeded():
    zeros = [torch.zeros(200_000), torch.zeros(300, 100)]
    noisy = gaussian_noise(zeros, 0.05, torch.Generator().manual_seed(1))
    flat = torch.cat([n.flatten() for n in noisy])
    assert flat.std().item() == pytest.approx(0.05, rel=0.01)
    assert abs(flat.mean().item()) < 0.001
    again = gaussian_noise(zeros, 0.05, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(noisy, again, strict=True))
    assert all(torch.equal(n, u) for n, u in zip(gaussian_noise(zeros, 0.0), zeros, strict=True))


def test_composition_applies_in_order():
    original = update()
    norm = float(global_norm(original))
    # clip, then noise: the noise is added on top of the clipped update
    gen = torch.Generator().manual_seed(3)
    out = apply_defenses(original, "clip:1.0+noise:0.5", gen)
    expected = gaussian_noise(clip(original, 1.0), 0.5, torch.Generator().manual_seed(3))
    assert all(torch.allclose(a, b) for a, b in zip(out, expected, strict=True))
    # topk, then clip: sparse and within the bound
    out = apply_defenses(original, ["topk:0.1", "clip:0.5"])
    assert float(global_norm(out)) <= 0.5 + 1e-6 < norm
    assert int((out[0] != 0).sum()) == math.ceil(0.1 * original[0].numel())
    # none: equal values, new tensors
    same = apply_defenses(original, "none")
    assert all(torch.equal(a, b) and a is not b for a, b in zip(same, original, strict=True))


def test_spec_parsing():
    assert parse_defenses("topk:0.1") == [DefenseSpec("topk", 0.1)]
    assert parse_defenses("clip:1+noise:0.01") == [
        DefenseSpec("clip", 1.0),
        DefenseSpec("noise", 0.01),
    ]
    assert parse_defenses("none") == []
    assert str(DefenseSpec.parse("noise:1e-3")) == "noise:0.001"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "topk",
        "topk:",
        "topk:0",
        "topk:1.5",
        "noise:-1",
        "clip:0",
        "clip:abc",
        "prune:0.1",
        "noise:nan",
        "none:1",
    ],
)
def test_spec_parsing_rejects_bad_strings(text):
    with pytest.raises(ValueError):
        parse_defenses(text)
