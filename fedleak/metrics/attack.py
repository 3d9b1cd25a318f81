"""Did a GAN attack reconstruct the victim's class? Scores generated images against ground truth.

An evaluator's target-class rate alone is not evidence: a passive GAN's noise blobs reach 98-100%
"target". Nor is closeness to real images: a blank tile is nearer to MNIST digits than real test
digits are. So next to the rate we measure proximity (L2 distance and SSIM to the nearest real
image), realism as a set (a Fréchet distance in the evaluator's feature space, with a threshold
calibrated on real held-out images: :mod:`fedleak.metrics.realism`) and diversity (pairwise
spread relative to real images of the class). Only the evaluation calls this; the attacker never
sees the reference set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from fedleak.data import ImageSet
from fedleak.metrics.classification import logits
from fedleak.metrics.realism import Calibration, FrechetRealism

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


# What each measure is, for reports: only the FD and the diversity speak to realism.
MEASURES: dict[str, str] = {
    "target_rate": "evaluator target-class rate (an independent classifier; noise can fool it)",
    "target_confidence": "evaluator's mean probability of the target class",
    "nn_l2_median": "median L2 distance to the nearest real image (proximity, not realism)",
    "nn_ssim_target": "mean best SSIM against real target-class images",
    "nn_ssim_other": "mean best SSIM against real images of other classes",
    "diversity": "pairwise spread relative to real target-class images (~1 real, ~0 copies)",
    "fd": "Fréchet distance to the victim's real target-class images, evaluator features",
    "fd_threshold": "FD threshold calibrated on real held-out sets of the same size",
    "fd_size": "images per set at which the FD and its threshold are computed",
}
# Real sets score ~1, copies of one image ~0; the GAN attack's recognisable 0s 0.4-0.5.
MIN_DIVERSITY = 0.2


@dataclass(frozen=True)
class GeneratedScore:
    """One scored sample set.

    ``realistic``: the FD within its calibrated threshold and diversity at least
    ``min_diversity``. ``success``: the evaluator's rate at least ``success_rate``, realistic,
    and, when ``nn_l2_threshold`` is set, the median nearest-real distance within it (a
    proximity bound the MNIST presets keep; it is not counted as realism).
    """

    num_images: int
    target_rate: float
    target_confidence: float
    nn_l2_median: float
    nn_ssim_target: float
    nn_ssim_other: float
    diversity: float
    fd: float
    fd_threshold: float
    fd_size: int
    fd_calibration: str
    success_rate: float
    min_diversity: float = MIN_DIVERSITY
    nn_l2_threshold: float | None = None

    @property
    def realism_failures(self) -> list[str]:
        """Why the set is not realistic; empty when it is."""
        why = []
        if not self.fd <= self.fd_threshold:
            why.append(
                "FD not measurable for fewer than 2 images"
                if math.isnan(self.fd)
                else f"FD {self.fd:.3g} > threshold {self.fd_threshold:.3g}"
            )
        if not self.diversity >= self.min_diversity:
            why.append(
                "diversity not measurable"
                if math.isnan(self.diversity)
                else f"diversity {self.diversity:.2f} < {self.min_diversity:g}"
            )
        return why

    @property
    def failures(self) -> list[str]:
        """Why the set is not a success; empty when it is."""
        why = []
        if not self.target_rate >= self.success_rate:
            why.append(f"evaluator target rate {self.target_rate:.2f} < {self.success_rate:g}")
        why += self.realism_failures
        if self.nn_l2_threshold is not None and not self.nn_l2_median <= self.nn_l2_threshold:
            why.append(
                f"median distance to the nearest real image {self.nn_l2_median:.1f} "
                f"> {self.nn_l2_threshold:g}"
            )
        return why

    @property
    def realistic(self) -> bool:
        return not self.realism_failures

    @property
    def success(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """The record for attack.jsonl: every field, both verdicts, and the reasons behind them
        (``realism``, ``verdict``: one readable line each)."""
        realism, failures = self.realism_failures, self.failures
        return {
            **asdict(self),
            "realistic": not realism,
            "realism": "realistic" if not realism else "not realistic: " + "; ".join(realism),
            "success": not failures,
            "verdict": "success" if not failures else "no success: " + "; ".join(failures),
        }


def _held_out(reference: ImageSet) -> ImageSet:
    from fedleak.data import load_dataset
    from fedleak.errors import FedleakError

    try:
        return load_dataset(reference.name, "test")
    except FedleakError as err:
        raise ValueError(
            f"realism needs held-out real images (the {reference.name} test split): {err}"
        ) from None


def _reference(
    reference: ImageSet, target: int, max_per_class: int | None, rng: torch.Generator
) -> ImageSet:
    """The reference subsampled per class with ``rng`` (seeded: the same images every call)."""
    images = _as_batch(reference.images, "reference images")
    ref, labels = _subsample_per_class(
        images, torch.as_tensor(reference.labels), max_per_class, rng
    )
    if not (labels == target).any():
        raise ValueError(f"reference set has no images of target class {target}")
    return ImageSet(ref, labels, reference.classes, reference.name)


def calibrate_realism(
    num_images: int,
    *,
    target: int,
    evaluator: nn.Module,
    reference: ImageSet,
    held_out: ImageSet | None = None,
    max_per_class: int | None = MAX_PER_CLASS,
) -> Calibration:
    """The FD calibration that sets of ``num_images`` will be scored against, computed now
    (or read from the cache): call it before a run so that the one-off cost (a few CPU seconds
    on MNIST) does not land on the first scored round. Same arguments as :func:`score_samples`.
    """
    subsampled = _reference(reference, target, max_per_class, torch.Generator().manual_seed(SEED))
    held = held_out if held_out is not None else _held_out(reference)
    frechet = FrechetRealism(evaluator, subsampled, held, target)
    return frechet.calibrate(max(2, frechet.size_for(num_images)))


def score_samples(
    generated: torch.Tensor,
    *,
    target: int,
    evaluator: nn.Module,
    reference: ImageSet,
    held_out: ImageSet | None = None,
    realism_threshold: float | None = 15.0,
    success_rate: float = 0.8,
    candidates: int = 32,
    max_per_class: int | None = MAX_PER_CLASS,
) -> GeneratedScore:
    """Score images a GAN produced for class ``target`` against the real ``reference`` set.

    - evaluator: ``target_rate`` (share classified as ``target``) and ``target_confidence``;
    - proximity: ``nn_l2_median``, the median L2 to the nearest reference image of any class
      (~9 for real MNIST digits, 7.7 for blank tiles: a distance, not realism), and
      ``nn_ssim_target`` / ``nn_ssim_other``, the mean best SSIM against the target class / the
      other classes over each image's ``candidates`` L2-nearest images (see :func:`nn_ssim`);
    - realism: ``fd``, the Fréchet distance in the evaluator's feature space to the reference's
      target-class images, against a threshold calibrated on real ``held_out`` images (default:
      the test split of ``reference.name``) at the same set size (:mod:`fedleak.metrics.realism`),
      and ``diversity``, the mean pairwise L2 of the samples over that of as many real target
      images (~1 as varied as real data, ~0 copies; NaN for one image).

    ``realism_threshold`` (None: off) additionally bounds ``nn_l2_median``. The reference is
    subsampled to ``max_per_class`` images per class with a fixed seed: scores are reproducible.
    """
    rng = torch.Generator().manual_seed(SEED)
    subsampled = _reference(reference, target, max_per_class, rng)
    ref, labels = subsampled.images, subsampled.labels
    gen = _check_generated(generated, ref)
    is_target = labels == target

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

    held = held_out if held_out is not None else _held_out(reference)
    frechet = FrechetRealism(evaluator, subsampled, held, target).score(gen)
    return GeneratedScore(
        num_images=len(gen),
        target_rate=target_rate,
        target_confidence=target_confidence,
        nn_l2_median=float(np.median(nn_l2.numpy())),
        nn_ssim_target=ssim_target,
        nn_ssim_other=ssim_other,
        diversity=diversity,
        fd=frechet.fd,
        fd_threshold=frechet.calibration.threshold,
        fd_size=frechet.size,
        fd_calibration=frechet.calibration.describe(),
        success_rate=success_rate,
        nn_l2_threshold=realism_threshold,
    )


def score_generated(generated: torch.Tensor, **kwargs) -> dict:
    """:func:`score_samples` as the attack.jsonl record (a dict with the same keys as before,
    plus the FD, its threshold and calibration, and the realism verdict)."""
    return score_samples(generated, **kwargs).to_dict()
