"""Time per iteration of Inverting Gradients with R restarts: one batched run vs R sequential runs.

Setting: DLG's sigmoid LeNet (seed 1234), one real CIFAR-10 test image (test_00000, a cat),
FedSGD, the inverting-gradients preset with 8 restarts. Both modes are measured in the same
process, interleaved (batched, sequential, batched, ...) after a warm-up of each, and the median
over the repeats is reported; the target is batched/sequential <= 0.5. When CUDA is available
the same comparison runs on the GPU too.

    python benchmarks/inversion_restarts.py [--iterations 40] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedleak.attacker.inversion import Observation, fedsgd_update, get_attack
from fedleak.data import load_dataset
from fedleak.models.leakage import SigmoidLeNet

MODES = ("batched", "sequential")


def _setting(data_root: str | None) -> tuple[torch.nn.Module, Observation]:
    cifar = load_dataset("cifar10", "test", data_root)
    first_cat = int((cifar.labels == 3).nonzero()[0])  # test_00000.png: files are class-sorted
    x, y = cifar.images[first_cat : first_cat + 1], cifar.labels[first_cat : first_cat + 1]
    torch.manual_seed(1234)
    model = SigmoidLeNet(10)
    return model, fedsgd_update(model, x, y)


def _seconds_per_iteration(
    model: torch.nn.Module, obs: Observation, mode: str, restarts: int, iterations: int, device: str
) -> float:
    attack = get_attack(
        "inverting-gradients", restarts=restarts, restarts_mode=mode, iterations=iterations
    )
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    rec = attack.reconstruct(model, obs)  # returns CPU tensors, so the GPU is done here
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / rec.iterations


def measure(
    model: torch.nn.Module,
    obs: Observation,
    device: str,
    restarts: int,
    iterations: int,
    repeats: int,
) -> dict[str, float]:
    model, obs = model.to(device), obs.to(device)
    for mode in MODES:  # warm-up: allocator, kernels, vmap's first trace
        _seconds_per_iteration(model, obs, mode, restarts, max(3, iterations // 10), device)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            times[mode].append(
                _seconds_per_iteration(model, obs, mode, restarts, iterations, device)
            )
    return {mode: statistics.median(values) for mode, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=40, help="timed iterations per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--data-root", default=None, help="default: FEDLEAK_DATA_ROOT")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, obs = _setting(args.data_root)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"inverting-gradients, {args.restarts} restarts, sigmoid LeNet, CIFAR-10 batch 1; "
        f"{args.iterations} iterations x {args.repeats} repeats, median; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    for device in devices:
        result = measure(model, obs, device, args.restarts, args.iterations, args.repeats)
        ratio = result["batched"] / result["sequential"]
        verdict = "meets" if ratio <= 0.5 else "misses"
        print(
            f"{device:>4}: batched {1e3 * result['batched']:8.2f} ms/iteration | "
            f"sequential {1e3 * result['sequential']:8.2f} ms/iteration | "
            f"ratio {ratio:.3f} ({verdict} the <= 0.5 target)"
        )


if __name__ == "__main__":
    main()
