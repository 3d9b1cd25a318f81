"""Did a GAN attack reconstruct the victim's class? Scores generated images against ground truth.

An evaluator's target-class rate alone is not evidence: a passive GAN's noise blobs reach 98-100%
"target" (see FINDINGS.md). So next to the rate we measure realism (L2 distance and SSIM to the
nearest real image) and diversity (pairwise spread relative to real images of the class).
Only the evaluation calls this; the attacker never sees the reference set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedleak.metrics.classification import logits

if TYPE_CHECKING:
    from fedleak.data import ImageSet

MAX_PER_CLASS = 2000  # reference images kept per class: bounds the cost on MNIST's 6000/class
DIVERSITY_SAMPLE = 1000  # at most this many images enter each pairwise-distance mean
SEED = 0
_CHUNK = 4096


def _as_batch(images: torch.Tensor, what: str) -> torch.Tensor:
    images = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{what} must be a non-empty NxCxHxW batch, got {tuple(images.shape)}")
    return images


def _check_generated(generated: torch.Tensor, reference_images: torch.Tensor) -> torch.Tensor:
    gen = _as_batch(generated, "generated images")
    if gen.shape[1:] != reference_images.shape[1:]:
        raise ValueError(
            f"generated images are {tuple(gen.shape[1:])} but reference images are "
            f"{tuple(reference_images.shape[1:])}: wrong dataset or generator?"
        )
    bad = int((~torch.isfinite(gen.flatten(1))).any(dim=1).sum())
    if bad:
        raise ValueError(
            f"{bad} of {len(gen)} generated images contain NaN or Inf "
            "(the generator diverged); refusing to score them"
        )
    return gen


def _knn(query: torch.Tensor, ref: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of the k nearest ``ref`` images (L2) to each query, nearest first.

    Chunked over both sides so memory stays bounded for any reference size. cdist's float32
    matrix-multiply shortcut is within 1e-4 of float64 at image distances (>= ~3) and twice as
    fast; only near-zero distances blur (an exact copy scores ~0.02, not 0).
    """
    k = min(k, len(ref))
    q_all, r_all = query.flatten(1), ref.flatten(1)
    dists, idxs = [], []
    for qs in range(0, len(q_all), _CHUNK):
        q = q_all[qs : qs + _CHUNK]
        best_d = torch.empty(len(q), 0)
        best_i = torch.empty(len(q), 0, dtype=torch.int64)
        for rs in range(0, len(r_all), _CHUNK):
            d = torch.cdist(q, r_all[rs : rs + _CHUNK])
            i = torch.arange(rs, rs + d.shape[1]).expand_as(d)
            d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
            best_d, pos = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=True)
            best_i = i.gather(1, pos)
        dists.append(best_d)
        idxs.append(best_i)
    return torch.cat(dists), torch.cat(idxs)


def nearest_images(
    generated: torch.Tensor, reference_images: torch.Tensor, k: int = 1
) -> torch.Tensor:
    """Indices (N x k, nearest first) of each generated image's nearest reference images by L2."""
    ref = _as_batch(getattr(reference_images, "images", reference_images), "reference images")
    return _knn(_check_generated(generated, ref), ref, k)[1]


# scikit-image's structural_similarity defaults: a 7x7 uniform window, sample covariance, K1/K2,
# and the mean over the window centres at least 3 pixels from the border (the "valid" part of the
# filtered image). Batched in torch, it equals scikit-image to ~1e-12 at a fraction of the cost
# of 6,400 scikit-image calls per scored set.
_SSIM_WIN, _SSIM_RANGE, _SSIM_K1, _SSIM_K2 = 7, 2.0, 0.01, 0.03  # images in [-1, 1]: range 2
_SSIM_BATCH = 1 << 18  # float64 values per intermediate (2 MB): stays in cache, ~2x faster


def _box(x: torch.Tensor) -> torch.Tensor:
    """Mean over every full 7x7 window of the last two dimensions (running sums: O(1) a pixel)."""
    for dim in (-1, -2):
        c = x.cumsum(dim)
        c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim)
        n = c.shape[dim] - _SSIM_WIN
        x = c.narrow(dim, _SSIM_WIN, n) - c.narrow(dim, 0, n)
    return x / _SSIM_WIN**2


def _ssim_map(ux, uxx, uy, uyy, uxy) -> torch.Tensor:
    norm = _SSIM_WIN**2 / (_SSIM_WIN**2 - 1)  # sample covariance, as scikit-image
    vx, vy, vxy = norm * (uxx - ux * ux), norm * (uyy - uy * uy), norm * (uxy - ux * uy)
    c1, c2 = (_SSIM_K1 * _SSIM_RANGE) ** 2, (_SSIM_K2 * _SSIM_RANGE) ** 2
    return (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def _best_ssim(gen: torch.Tensor, ref: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Per generated image, the best mean SSIM (channels averaged) over its candidate reference
    images (N x k indices). Local means of each image are computed once, not once per pair."""
    if min(gen.shape[-2:]) < _SSIM_WIN:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WIN}x{_SSIM_WIN}")
    g = gen.double()
    used, where = torch.unique(cand, return_inverse=True)
    r = ref[used].double()
    gx, gxx, ry, ryy = _box(g), _box(g * g), _box(r), _box(r * r)
    k = cand.shape[1]
    per = max(1, _SSIM_BATCH // (k * gx[0].numel()))
    best = []
    for s in range(0, len(g), per):
        w = where[s : s + per]  # (b, k) rows of r
        x = g[s : s + per, None]
        uxy = _box(x * r[w])
        sim = _ssim_map(gx[s : s + per, None], gxx[s : s + per, None], ry[w], ryy[w], uxy)
        best.append(sim.flatten(2).mean(2).amax(1))
    return torch.cat(best)


def nn_ssim(
    generated: torch.Tensor, reference_images: torch.Tensor, candidates: int = 32
) -> torch.Tensor:
    """Per generated image, the best SSIM (scikit-image) against the reference images.

    SSIM is too slow to compute against thousands of images, so only each image's ``candidates``
    nearest reference images by L2 are compared: an approximation of the true maximum that is
    exact when ``candidates >= len(reference_images)``.
    """
    ref = _as_batch(reference_images, "reference images")
    gen = _check_generated(generated, ref)
    return _best_ssim(gen, ref, _knn(gen, ref, candidates)[1])


def _mean_pairwise(x: torch.Tensor) -> float:
    flat = x.flatten(1).double()
    total = sum(
        float(torch.cdist(flat[s : s + _CHUNK], flat).sum()) for s in range(0, len(flat), _CHUNK)
    )
    return total / (len(flat) * (len(flat) - 1))  # the zero diagonal is excluded by the divisor


def _sample(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return x if len(x) <= n else x[torch.randperm(len(x), generator=gen)[:n]]


def _subsample_per_class(
    images: torch.Tensor, labels: torch.Tensor, max_per_class: int | None, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if max_per_class is None:
        return images, labels
    keep = []
    for c in np.unique(labels.numpy()):  # numpy: torch.unique was oddly slow on a busy CPU
        idx = (labels == int(c)).nonzero().flatten()
        keep.append(_sample(idx, max_per_class, gen))
    keep_idx = torch.cat(keep).sort().values
    return images[keep_idx], labels[keep_idx]


def score_generated(
    generated: torch.Tensor,
    *,
    target: int,
    evaluator: nn.Module,
    reference: ImageSet,
    realism_threshold: float | None = 15.0,
    success_rate: float = 0.8,
    candidates: int = 32,
    max_per_class: int | None = MAX_PER_CLASS,
) -> dict:
    """Score images a GAN produced for class ``target`` against the real ``reference`` set.

    Returns ``target_rate`` and ``target_confidence`` (evaluator), ``nn_l2_median`` (median L2 to
    the nearest reference image of any class; ~9 for real MNIST digits, 21-26 for noise blobs),
    ``nn_ssim_target`` / ``nn_ssim_other`` (mean best SSIM against the target class / all other
    classes, each over the ``candidates`` L2-nearest images, see :func:`nn_ssim`), ``diversity``
    (mean pairwise L2 of the generated images over that of as many real target images: ~1 as
    diverse as real data, ~0 mode collapse; NaN for a single image), ``num_images`` and
    ``success``: rate >= ``success_rate`` and, unless ``realism_threshold`` is None, median
    L2 <= threshold. The reference is subsampled to ``max_per_class`` images per class with a
    fixed seed, so scores are reproducible.
    """
    ref_all = _as_batch(reference.images, "reference images")
    gen = _check_generated(generated, ref_all)
    rng = torch.Generator().manual_seed(SEED)
    ref, labels = _subsample_per_class(
        ref_all, torch.as_tensor(reference.labels), max_per_class, rng
    )
    is_target = labels == target
    if not is_target.any():
        raise ValueError(f"reference set has no images of target class {target}")

    probs = logits(evaluator, gen).softmax(dim=1)
    if not 0 <= target < probs.shape[1]:
        raise ValueError(f"target {target} outside the evaluator's {probs.shape[1]} classes")
    target_rate = float((probs.argmax(dim=1) == target).double().mean())
    target_confidence = float(probs[:, target].double().mean())

    tgt, other = ref[is_target], ref[~is_target]
    d_t, i_t = _knn(gen, tgt, candidates)
    nn_l2 = d_t[:, 0]
    ssim_other = float("nan")
    if len(other):
        d_o, i_o = _knn(gen, other, candidates)
        nn_l2 = torch.minimum(nn_l2, d_o[:, 0])
        ssim_other = float(_best_ssim(gen, other, i_o).mean())
    ssim_target = float(_best_ssim(gen, tgt, i_t).mean())

    diversity = float("nan")
    if len(gen) >= 2 and len(tgt) >= 2:
        n = min(len(gen), len(tgt), DIVERSITY_SAMPLE)
        real_spread = _mean_pairwise(_sample(tgt, n, rng))
        if real_spread > 0:
            diversity = _mean_pairwise(_sample(gen, n, rng)) / real_spread

    nn_l2_median = float(np.median(nn_l2.numpy()))
    success = target_rate >= success_rate and (
        realism_threshold is None or nn_l2_median <= realism_threshold
    )
    return {
        "target_rate": target_rate,
        "target_confidence": target_confidence,
        "nn_l2_median": nn_l2_median,
        "nn_ssim_target": ssim_target,
        "nn_ssim_other": ssim_other,
        "diversity": diversity,
        "num_images": len(gen),
        "success": bool(success),
    }
