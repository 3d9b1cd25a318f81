"""Reconstruction metrics agree with their definitions and with scikit-image."""

from __future__ import annotations

import logging
import math
import sys
import types

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fedleak.data import load_dataset
from fedleak.metrics.images import (
    label_accuracy,
    lpips_or_none,
    match,
    mse,
    psnr,
    score_batch,
    ssim,
)


def _images(n: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 32, 32, generator=gen) * 2 - 1


def test_psnr_matches_the_formula_on_a_constant_offset():
    originals = torch.full((2, 1, 8, 8), -0.5)  # 0.25 in [0, 1]
    recon = originals + 0.2  # 0.1 brighter in [0, 1]
    assert torch.allclose(mse(recon, originals), torch.tensor([0.01, 0.01], dtype=torch.float64))
    assert torch.allclose(psnr(recon, originals), torch.tensor([20.0, 20.0], dtype=torch.float64))


def test_psnr_matches_skimage_on_real_images(data_root):
    cifar = load_dataset("cifar10", "test", data_root)
    originals = cifar.images[:4]
    recon = (originals + 0.1 * _images(4)).clamp(-1, 1)
    ours = psnr(recon, originals)
    for i in range(4):
        a = ((recon[i].double() + 1) / 2).numpy()
        b = ((originals[i].double() + 1) / 2).numpy()
        assert ours[i] == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0), abs=1e-9)


def test_reconstructions_are_clipped_to_the_image_range():
    originals = torch.ones(1, 1, 8, 8)  # white
    assert psnr(originals * 5, originals)[0] == math.inf  # brighter than white is still white


def test_ssim_matches_skimage_rgb_and_grey():
    originals, recon = _images(3), _images(3, seed=1)
    recon = 0.7 * originals + 0.3 * recon
    ours = ssim(recon, originals)
    for i in range(3):
        a = np.moveaxis(((recon[i].double() + 1) / 2).numpy(), 0, -1)
        b = np.moveaxis(((originals[i].double() + 1) / 2).numpy(), 0, -1)
        ref = structural_similarity(a, b, data_range=1.0, channel_axis=-1)
        assert ours[i] == pytest.approx(ref, abs=1e-9)
    grey, grey_rec = originals[:, :1], recon[:, :1]
    ref = structural_similarity(
        ((grey_rec[0, 0].double() + 1) / 2).numpy(),
        ((grey[0, 0].double() + 1) / 2).numpy(),
        data_range=1.0,
    )
    assert ssim(grey_rec, grey)[0] == pytest.approx(ref, abs=1e-9)
    assert ssim(originals, originals).tolist() == pytest.approx([1.0] * 3)


def test_match_recovers_a_shuffled_permutation_exactly():
    originals = _images(8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    noisy = (originals + 0.05 * _images(8, seed=2))[perm]  # reconstruction i is original perm[i]
    order = match(noisy, originals)
    assert torch.equal(perm[order], torch.arange(8))
    assert not torch.equal(perm, torch.arange(8))


def test_score_batch_pairs_before_scoring():
    originals = _images(4)
    perm = torch.tensor([2, 0, 3, 1])
    recon = (originals + 0.02 * _images(4, seed=3)).clamp(-1, 1)[perm]
    scores = score_batch(recon, originals, [1, 1, 2, 5], [1, 2, 2, 5])
    unmatched = psnr(recon, originals).mean()
    assert scores["psnr"] > 35 > float(unmatched)
    assert scores["ssim"] > 0.95
    assert len(scores["psnr_per_image"]) == 4
    assert scores["label_accuracy"] == pytest.approx(3 / 4)
    assert score_batch(recon, originals)["label_accuracy"] is None


def test_label_accuracy_is_a_multiset_match():
    assert label_accuracy([3, 3, 1], [1, 3, 3]) == 1.0
    assert label_accuracy([3, 3, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert label_accuracy(torch.tensor([0]), torch.tensor([1])) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        mse(_images(2), _images(3))


def test_lpips_without_the_package_is_none_with_a_message(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    with caplog.at_level(logging.WARNING):
        assert lpips_or_none(_images(1), _images(1)) is None
    assert "LPIPS skipped" in caplog.text and "not installed" in caplog.text


def test_lpips_without_local_weights_is_none_with_a_message(monkeypatch, caplog, tmp_path):
    def must_not_load(**_kwargs):
        raise AssertionError("LPIPS must not try to fetch weights")

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=must_not_load))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert lpips_or_none(_images(1), _images(1)) is None
    assert "LPIPS skipped" in caplog.text and "alexnet" in caplog.text
