"""Cost of scoring one GAN sample set: today's scorer (with the FD realism check) vs the scorer
of a base revision (evaluator rate, NN-L2, per-pair scikit-image SSIM, diversity), same run.

Scoring runs in the experimenter's process while the federation trains on the same cores, so
each call should stay around a second. Setting: 100 real images scored as class 0 against the
full train split (MNIST: held-out 0s, 32x32; AT&T faces: 64x64 photos), the cached evaluators,
one torch thread. Both scorers are called alternately after a warm-up; the median wall and CPU
seconds per call are printed, and their ratio. The FD's one-off calibration (per dataset, class
and set size, then cached on disk) is timed separately, from an empty cache.

    python benchmarks/score_cost.py [--base f2c84bb] [--repeats 5]

``--base`` is the git revision whose ``fedleak/metrics/attack.py`` is the baseline (default:
the last commit before the FD; its module is loaded from git, so run this in a git checkout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import types
from functools import partial
from pathlib import Path

import torch

from fedleak.data import load_dataset
from fedleak.metrics import realism
from fedleak.metrics.attack import score_samples
from fedleak.models.evaluator import get_evaluator

REPO = Path(__file__).resolve().parents[1]


def _base_scorer(rev: str):
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:fedleak/metrics/attack.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"base_attack_{rev}")
    exec(compile(source, f"{rev}:fedleak/metrics/attack.py", "exec"), module.__dict__)
    return module.score_generated


def _timed(call) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def _with_cache_dir(path: str, call) -> tuple[float, float]:
    before = os.environ.get("FEDLEAK_CACHE_DIR")
    os.environ["FEDLEAK_CACHE_DIR"] = path
    try:
        return _timed(call)
    finally:
        if before is None:
            del os.environ["FEDLEAK_CACHE_DIR"]
        else:
            os.environ["FEDLEAK_CACHE_DIR"] = before


def _measure(dataset: str, nn_bound: float | None, base, repeats: int) -> None:
    evaluator, _ = get_evaluator(dataset)
    train, test = load_dataset(dataset), load_dataset(dataset, "test")
    # 100 images, as the GAN attack sends: faces have only 2 held-out photos per person, so the
    # faces set (for the cost only) is all 80 held-out photos and 20 training photos.
    images = torch.cat([test.images[test.labels == 0], test.images, train.images])[:100]
    kw = {"target": 0, "evaluator": evaluator, "reference": train, "realism_threshold": nn_bound}
    scorers = {"base": partial(base, images, **kw), "fd": partial(score_samples, images, **kw)}

    # The one-off calibration, from an empty cache in a fresh temporary folder.
    realism._GAUSSIANS.clear()
    with tempfile.TemporaryDirectory() as tmp:
        first = _with_cache_dir(tmp, scorers["fd"])
        second = _with_cache_dir(tmp, scorers["fd"])
    print(f"{dataset:8} {'fd first':10} {first[0]:8.2f} {first[1]:8.2f}   (calibration + call)")
    print(f"{dataset:8} {'fd second':10} {second[0]:8.2f} {second[1]:8.2f}   (calibration cached)")

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in scorers}
    for call in scorers.values():
        call()  # warm-up: caches, lazily built kernels
    for _ in range(repeats):
        for name, call in scorers.items():
            times[name].append(_timed(call))
    med = {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for name, ts in times.items()
    }
    for name, (wall, cpu) in med.items():
        print(f"{dataset:8} {name:10} {wall:8.2f} {cpu:8.2f}")
    ratio = (med["fd"][0] / med["base"][0], med["fd"][1] / med["base"][1])
    print(f"{dataset:8} {'fd/base':10} {ratio[0]:8.2f} {ratio[1]:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="f2c84bb")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = _base_scorer(args.base)
    print(f"{'dataset':8} {'scorer':10} {'wall s':>8} {'cpu s':>8}")
    for dataset, nn_bound in (("mnist", 15.0), ("faces", None)):
        _measure(dataset, nn_bound, base, args.repeats)


if __name__ == "__main__":
    main()
