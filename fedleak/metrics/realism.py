"""Do generated images look like the victim's class as a *set*? A Fréchet distance (FD).

The nearest-neighbour L2 distance measures proximity, not realism: a blank MNIST image lies
closer to real digits (7.7) than real test digits do (8.8). FD (the statistic behind FID, Heusel
et al. 2017) compares the mean and covariance of the samples' features with those of the victim's
real target-class images, so blank, constant, noise and blob sets fail it. The features are the
penultimate layer of the independent evaluator (``EvaluatorNet.embed``), not Inception: nothing
is downloaded, and the space is trained on the dataset being attacked.

The threshold is calibrated on real images that the reference does not contain (the test split),
at the sample set's own size: FD is biased upward for small sets (the covariance of 20 points in
128 dimensions is poor), so one fixed threshold would be wrong at every size but one. Two real
anchors are measured at that size: how far real held-out sets of the target class are from the
reference (95th percentile over many draws), and how far real sets of the nearest *other* class
are. The threshold lies halfway between them in sqrt(FD), the Wasserstein-2 distance between the
two Gaussians: a set passes when it is nearer to what real target images give than to what the
nearest wrong class gives. On MNIST (class 0, 100 images) that is FD ~43 between real sets at
~1.5 and the nearest other digit at ~141; constant, mean, noise, blob and model-inversion sets
sit at 85-280 (tests/test_realism.py), the GAN attack's 0s at 23-39 from round 28 of a
gan-mnist run on (its blobs before that at 61-210).
Calibrations are cached per (dataset, class, size) under ``cache_dir()/realism``.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedleak.data import ImageSet
from fedleak.metrics.classification import eval_mode
from fedleak.models.evaluator import cache_dir
from fedleak.runfolder import atomic_write_text

CACHE_VERSION = 2
DRAWS = 100  # real held-out target-class sets drawn per calibration
OTHER_DRAWS = 10  # sets per other class: its median FD is that class's distance
QUANTILE = 0.95
POOL_BELOW = 20  # fewer held-out target images than this: calibrate on the other classes
SUBSETS = 51  # random subsets whose median FD scores a set larger than the calibrated size
SEED = 0

Embed = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Calibration:
    """Where real sets of ``size`` images lie, and the FD threshold between them.

    ``method`` is ``"held-out"`` (``draws`` random sets of the target class's own held-out
    images) or ``"pooled"`` (too few held-out images of the target class, e.g. 2 per AT&T face:
    each *other* class's held-out set against that class's own reference images, so the target
    class's held-out images stay out of the calibration). ``nearest_fd`` is the FD of real
    held-out sets of ``nearest_class``, the other class closest to the target's reference.
    """

    dataset: str
    target: int
    size: int
    method: str
    draws: int
    real_median: float
    real_p95: float
    real_max: float
    nearest_class: int
    nearest_fd: float
    threshold: float
    fingerprint: str

    def describe(self) -> str:
        real = (
            f"real held-out class-{self.target} sets (95th percentile {self.real_p95:.3g} "
            f"over {self.draws} draws of {self.size}; median {self.real_median:.3g})"
            if self.method == "held-out"
            else f"real held-out sets of {self.size} of {self.draws} other classes, each against "
            f"its own class (95th percentile {self.real_p95:.3g}; median {self.real_median:.3g})"
        )
        return (
            f"FD threshold {self.threshold:.3g}: halfway in sqrt(FD) between {real} and real "
            f"sets of the nearest other class ({self.nearest_class}: {self.nearest_fd:.3g})"
        )


@dataclass(frozen=True)
class FrechetScore:
    """FD of a sample set to the target class's real images, and the calibrated threshold.

    ``fd`` is NaN when it cannot be measured (fewer than 2 images). A set larger than the
    calibrated size is scored as the median FD over random subsets of that size.
    """

    fd: float
    size: int
    calibration: Calibration

    @property
    def within(self) -> bool:
        return self.fd <= self.calibration.threshold  # False for NaN


class _Gaussian:
    """Mean and covariance of features, with what FD needs precomputed (float64)."""

    def __init__(self, features: torch.Tensor) -> None:
        f = features.double()
        self.mean = f.mean(0)
        self.cov = torch.cov(f.T)
        w, v = torch.linalg.eigh(self.cov)
        self.cov_sqrt = (v * w.clamp(min=0).sqrt()) @ v.T
        self.trace = float(self.cov.trace())

    def distance(self, features: torch.Tensor) -> float:
        """FD = |mu - mu_r|^2 + tr(S) + tr(S_r) - 2 tr((S_r^1/2 S S_r^1/2)^1/2).

        The symmetric form keeps the matrix square root real and stable when S is singular,
        which it always is for fewer images than feature dimensions.
        """
        f = features.double()
        mean, cov = f.mean(0), torch.cov(f.T)
        inner = torch.linalg.eigvalsh(self.cov_sqrt @ cov @ self.cov_sqrt).clamp(min=0)
        value = (
            float(((mean - self.mean) ** 2).sum())
            + float(cov.trace())
            + self.trace
            - 2 * float(inner.sqrt().sum())
        )
        return max(value, 0.0)


def embedding(evaluator: nn.Module) -> Embed:
    """The evaluator's feature map; realism cannot be measured by a model without one."""
    embed = getattr(evaluator, "embed", None)
    if not callable(embed):
        raise ValueError(
            f"{type(evaluator).__name__} has no embed(): the realism score needs the "
            "evaluator's feature space (fedleak.models.evaluator.EvaluatorNet)"
        )

    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        with eval_mode(evaluator):
            return torch.cat([embed(images[i : i + 1000]) for i in range(0, len(images), 1000)])

    return run


_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}
_GAUSSIANS: dict[tuple[str, int], _Gaussian] = {}


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's values, remembered while the same unmodified tensor is alive: the
    held-out split is one cached tensor that every call of a run passes again."""
    memo = _DIGESTS.get(id(t))
    if memo is not None and memo[0]() is t and memo[1] == t._version:
        return memo[2]
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    digest = h.hexdigest()
    if len(_DIGESTS) > 64:
        _DIGESTS.clear()
    _DIGESTS[id(t)] = (weakref.ref(t), t._version, digest)
    return digest


def _digest(evaluator: nn.Module, *tensors: torch.Tensor) -> str:
    parts = [*evaluator.state_dict().values(), *tensors]
    return hashlib.sha256("".join(_tensor_digest(t) for t in parts).encode()).hexdigest()[:16]


def _of_class(images: ImageSet, c: int) -> torch.Tensor:
    return images.images[images.labels == c]


def _draws(pool: torch.Tensor, size: int, count: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [pool[torch.randperm(len(pool), generator=gen)[:size]] for _ in range(count)]


class FrechetRealism:
    """FD in an evaluator's feature space to one class of a reference set, with the threshold
    calibrated on ``held_out`` (real images not in the reference) and cached on disk."""

    def __init__(
        self, evaluator: nn.Module, reference: ImageSet, held_out: ImageSet, target: int
    ) -> None:
        self.embed = embedding(evaluator)
        self.reference, self.held_out, self.target = reference, held_out, target
        if held_out.images.shape[1:] != reference.images.shape[1:]:
            raise ValueError(
                f"held-out images are {tuple(held_out.images.shape[1:])} but reference images "
                f"are {tuple(reference.images.shape[1:])}"
            )
        ref_target = _of_class(reference, target)
        if len(ref_target) < 2:
            raise ValueError(f"FD needs at least 2 reference images of class {target}")
        own = int((held_out.labels == target).sum())
        self.pooled = own < POOL_BELOW
        self.others = self._other_classes()
        counts = [int((held_out.labels == c).sum()) for c in self.others]
        # Draws of at most half a pool still differ from each other; pooled sets are whole.
        self.cap = min(counts, default=0) if self.pooled else own // 2
        if self.cap < 2 or not self.others:
            raise ValueError(
                f"too few held-out real images to calibrate FD for class {target}: {own} of "
                "its own, and other classes with 2 or more are needed too"
            )
        parts = [ref_target, held_out.images, held_out.labels]
        if self.pooled:  # each other class is compared with its own reference images too
            parts += [reference.images, reference.labels]
        self.fingerprint = _digest(evaluator, *parts)
        # The reference's features are the costly part of a call (2,000 MNIST images, ~0.3 s);
        # a run scores the same reference every time, so keep its Gaussian for the process.
        key = (self.fingerprint, target)
        if key not in _GAUSSIANS:
            if len(_GAUSSIANS) >= 8:
                _GAUSSIANS.pop(next(iter(_GAUSSIANS)))
            _GAUSSIANS[key] = _Gaussian(self.embed(ref_target))
        self.target_gaussian = _GAUSSIANS[key]

    def _other_classes(self) -> list[int]:
        ref_counts = torch.bincount(self.reference.labels).tolist()
        held = torch.bincount(self.held_out.labels).tolist()
        return [
            c
            for c, count in enumerate(held)
            if c != self.target
            and count >= 2
            and (not self.pooled or (c < len(ref_counts) and ref_counts[c] >= 2))
        ]

    def _anchors(self, size: int, gen: torch.Generator) -> tuple[list[float], dict[int, float]]:
        """FDs of real sets of the target class (or, pooled, of each other class to its own
        reference) and, per other class, the FD of its real sets to the target's reference."""
        if self.pooled:
            real, other = [], {}
            for c in self.others:
                (draw,) = _draws(self.embed(_of_class(self.held_out, c)), size, 1, gen)
                own = _Gaussian(self.embed(_of_class(self.reference, c)))
                real.append(own.distance(draw))
                other[c] = self.target_gaussian.distance(draw)
            return real, other
        target = self.embed(_of_class(self.held_out, self.target))
        real = [self.target_gaussian.distance(f) for f in _draws(target, size, DRAWS, gen)]
        other = {}
        for c in self.others:
            pool = self.embed(_of_class(self.held_out, c))
            if len(pool) < size:
                continue
            fds = [self.target_gaussian.distance(f) for f in _draws(pool, size, OTHER_DRAWS, gen)]
            other[c] = float(np.median(fds))
        return real, other

    def calibrate(self, size: int) -> Calibration:
        """The calibration at ``size`` images (read from the cache when it matches)."""
        name = f"{self.reference.name}-class{self.target}-n{size}-{self.fingerprint}.json"
        path = cache_dir() / "realism" / f"v{CACHE_VERSION}" / name
        cached = _read(path, self.fingerprint)
        if cached is not None:
            return cached
        real, other = self._anchors(size, torch.Generator().manual_seed(SEED))
        if not other:
            raise ValueError(f"no other class has {size} held-out images to calibrate FD")
        p95 = float(np.quantile(real, QUANTILE))
        nearest = min(other, key=other.__getitem__)
        calibration = Calibration(
            dataset=self.reference.name,
            target=self.target,
            size=size,
            method="pooled" if self.pooled else "held-out",
            draws=len(real),
            real_median=float(np.median(real)),
            real_p95=p95,
            real_max=float(max(real)),
            nearest_class=nearest,
            nearest_fd=other[nearest],
            threshold=((math.sqrt(p95) + math.sqrt(other[nearest])) / 2) ** 2,
            fingerprint=self.fingerprint,
        )
        atomic_write_text(path, json.dumps(asdict(calibration), indent=1))
        return calibration

    def size_for(self, num_images: int) -> int:
        """How many images a set of ``num_images`` is scored (and calibrated) at."""
        return min(num_images, self.cap)

    def score(self, generated: torch.Tensor) -> FrechetScore:
        size = self.size_for(len(generated))
        calibration = self.calibrate(max(size, 2))
        if size < 2:
            return FrechetScore(float("nan"), size, calibration)
        features = self.embed(generated)
        if size == len(generated):
            return FrechetScore(self.target_gaussian.distance(features), size, calibration)
        gen = torch.Generator().manual_seed(SEED)
        fds = [self.target_gaussian.distance(f) for f in _draws(features, size, SUBSETS, gen)]
        return FrechetScore(float(np.median(fds)), size, calibration)


def _read(path: Path, fingerprint: str) -> Calibration | None:
    """A cached calibration, or None when missing, damaged or for other inputs."""
    try:
        calibration = Calibration(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if calibration.fingerprint != fingerprint or not math.isfinite(calibration.threshold):
        return None
    return calibration
