"""R restarts run together vs one after another, for the L-BFGS and the Adam attacks.

Setting: DLG's sigmoid LeNet fed [0, 1] (``dlg-lenet``, seed 1234), one real CIFAR-10 test image
(test_00000, a cat), FedSGD, batch 1. For each attack (``idlg``: batched L-BFGS;
``inverting-gradients``: Adam under ``vmap``) and each R (4 and 8), the same R random starts run
a fixed number of steps once with ``restarts_mode="batched"`` and once ``"sequential"``; both
do the same work per restart (the same iterates, tested in tests/test_inversion_attacks.py).
The modes are interleaved (batched, sequential, batched, ...) after a warm-up, and the median
over the repeats is reported. Time is CPU time of this process (one thread), so a busy shared
machine does not tilt the ratio; wall time is printed beside it. The target is
batched / sequential <= 0.5. On a CUDA machine the GPU is measured too (wall time).

    python benchmarks/inversion_restarts.py [--restarts 4,8] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedleak.attacker.inversion import Observation, fedsgd_update, get_attack
from fedleak.data import load_dataset
from fedleak.models.leakage import dlg_lenet

MODES = ("batched", "sequential")
# L-BFGS steps are up to 20 evaluations each, Adam steps one: comparable work per run.
ATTACKS = {"idlg": 1, "inverting-gradients": 20}


def setting(data_root: str | None) -> tuple[torch.nn.Module, Observation]:
    cifar = load_dataset("cifar10", "test", data_root)
    first_cat = int((cifar.labels == 3).nonzero()[0])  # test_00000.png: files are class-sorted
    x, y = cifar.images[first_cat : first_cat + 1], cifar.labels[first_cat : first_cat + 1]
    torch.manual_seed(1234)
    model = dlg_lenet(10)
    return model, fedsgd_update(model, x, y)


def timed(
    model: torch.nn.Module, obs: Observation, attack: str, mode: str, restarts: int, steps: int
) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, evaluations) of one reconstruction."""
    rec_attack = get_attack(attack, restarts=restarts, restarts_mode=mode, iterations=steps)
    if obs.update[0].is_cuda:
        torch.cuda.synchronize()
    cpu, wall = time.process_time(), time.perf_counter()
    rec = rec_attack.reconstruct(model, obs)  # returns CPU tensors, so the GPU is done here
    return time.process_time() - cpu, time.perf_counter() - wall, rec.evaluations


def measure(
    model: torch.nn.Module,
    obs: Observation,
    attack: str,
    restarts: int,
    steps: int,
    repeats: int,
) -> dict[str, tuple[float, float, int]]:
    for mode in MODES:  # warm-up: allocator, kernels, vmap's first trace
        timed(model, obs, attack, mode, restarts, max(1, steps // 5))
    runs: dict[str, list[tuple[float, float, int]]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            runs[mode].append(timed(model, obs, attack, mode, restarts, steps))
    return {
        mode: (
            statistics.median(r[0] for r in values),
            statistics.median(r[1] for r in values),
            values[0][2],
        )
        for mode, values in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", default="4,8")
    parser.add_argument("--steps", type=int, default=10, help="L-BFGS steps (x20 for Adam)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--data-root", default=None, help="default: FEDLEAK_DATA_ROOT")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, obs = setting(args.data_root)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"restarts together vs one after another; sigmoid LeNet, CIFAR-10 batch 1; "
        f"{args.repeats} repeats, median; torch {torch.__version__}, 1 CPU thread",
        flush=True,
    )
    for device in devices:
        model_d, obs_d = model.to(device), obs.to(device)
        for attack in args.attacks.split(","):
            steps = args.steps * ATTACKS[attack]
            for r in (int(v) for v in args.restarts.split(",")):
                result = measure(model_d, obs_d, attack, r, steps, args.repeats)
                (b_cpu, b_wall, b_ev), (s_cpu, s_wall, s_ev) = (
                    result["batched"],
                    result["sequential"],
                )
                # On the GPU the host's CPU time is not the cost: compare wall time there.
                ratio = (b_cpu / s_cpu) if device == "cpu" else (b_wall / s_wall)
                verdict = "meets" if ratio <= 0.5 else "misses"
                print(
                    f"{device:>4} {attack:<20} R={r}: {steps} steps, evaluations {b_ev} / {s_ev}"
                    f" | batched {b_cpu:7.2f} s CPU ({b_wall:6.2f} s wall) | sequential "
                    f"{s_cpu:7.2f} s CPU ({s_wall:6.2f} s wall) | ratio {ratio:.3f} "
                    f"({verdict} the <= 0.5 target)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
