"""Study ``batch-sizes``: DLG, iDLG and Inverting Gradients side by side at batch sizes 1/2/4/8.

Setting: the federation's ``dlg-lenet`` (DLG's sigmoid LeNet fed [0, 1]), one set of weights
(``model.seed``), FedSGD: the attacker sees the gradient of the mean cross-entropy over a
private batch of B CIFAR-10 test images. Every attack inverts the same batches with its own
preset (``attack.restarts = 0``) or the number of restarts given: DLG optimises soft labels
jointly with the images, iDLG and Inverting Gradients take the labels from the update (exact
for B = 1, ``recover_labels`` beyond). Budgets: ``attack.lbfgs-steps`` L-BFGS steps for DLG and
iDLG, ``attack.ig-iterations`` Adam iterations for Inverting Gradients (its published 4800).

Scores after matching the reconstructions to the originals (minimum total MSE assignment):
PSNR and SSIM per image on [0, 1], label accuracy as a multiset, seconds of CPU time (one
thread, so a busy machine changes the wall clock, not the comparison) and wall time. Ground
truth is used only for scoring.

Measured with the preset (two batches per size, seed 0): mean PSNR at B = 1 / 2 / 4 / 8, DLG
26.8 / 18.7 / 7.6 / 7.8 dB, iDLG 51.1 / 24.9 / 15.1 / 13.1, Inverting Gradients 39.6 / 25.6 /
18.8 / 14.4; no attack reached 30 dB on any image beyond B = 2. 12.4 CPU-minutes in all.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from fedleak.attacker.inversion import fedsgd_update, get_attack
from fedleak.data import load_dataset
from fedleak.metrics.images import score_batch
from fedleak.models.leakage import dlg_lenet
from fedleak.report.grids import save_comparison_grid
from fedleak.report.plots import save_line_plot
from fedleak.runfolder import RunFolder
from fedleak.studies import write_results

ATTACKS = ("dlg", "idlg", "inverting-gradients")
SUCCESS_DB = 30.0

# Seconds, for tests and smoke checks: one batch of 1 and of 2, a few steps.
TINY_OVERRIDES = [
    "data.batches=1",
    "attack.batch-sizes=[1,2]",
    "attack.lbfgs-steps=2",
    "attack.ig-iterations=3",
]


def _attack(name: str, cfg: dict[str, Any]):
    a = cfg["attack"]
    budget = a["ig-iterations"] if name == "inverting-gradients" else a["lbfgs-steps"]
    options = {"iterations": int(budget)}
    if a["restarts"]:
        options["restarts"] = int(a["restarts"])
    return get_attack(name, **options)


def private_batches(cfg: dict[str, Any], count: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``count`` distinct test images drawn with the seed (each batch takes the next ones)."""
    data = cfg["data"]
    dataset = load_dataset(data["dataset"], data["split"], data["root"] or None)
    if count > len(dataset):
        raise ValueError(f"the study needs {count} images, the split has {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg["seed"]))
    idx = order[:count]
    return dataset.images[idx], dataset.labels[idx], idx.tolist()


def attack_batch(name: str, cfg: dict[str, Any], model, x, y, seed: int) -> tuple[dict, Any]:
    """One attack on one private batch: (row, reconstruction in the originals' order)."""
    observation = fedsgd_update(model, x, y)  # all the attacker gets
    attack = _attack(name, cfg)
    cpu = time.process_time()
    rec = attack.reconstruct(model, observation, generator=torch.Generator().manual_seed(seed))
    cpu = time.process_time() - cpu
    score = score_batch(rec.images, x, rec.labels, y)
    row = {
        "attack": name,
        "batch_size": len(x),
        "psnr": score["psnr"],
        "ssim": score["ssim"],
        "label_accuracy": score["label_accuracy"],
        "images_at_30db": sum(p >= SUCCESS_DB for p in score["psnr_per_image"]),
        "cpu_seconds": round(cpu, 2),
        "seconds": round(rec.seconds, 2),
        "iterations": rec.iterations,
        "evaluations": rec.evaluations,
        "restarts": len(rec.per_restart_loss),
        "restart": rec.restart,
        "final_loss": rec.per_restart_loss[rec.restart],
        "psnr_per_image": [round(p, 2) for p in score["psnr_per_image"]],
    }
    return row, rec.images[torch.as_tensor(score["order"])]


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def table_line(name: str, batch_size: int, rows: list[dict]) -> dict:
    images = sum(r["batch_size"] for r in rows)
    return {
        "attack": name,
        "batch_size": batch_size,
        "batches": len(rows),
        "mean_psnr": _mean([r["psnr"] for r in rows]),
        "median_psnr": statistics.median(r["psnr"] for r in rows),
        "mean_ssim": _mean([r["ssim"] for r in rows]),
        "images_at_30db": f"{sum(r['images_at_30db'] for r in rows)}/{images}",
        "label_accuracy": _mean([r["label_accuracy"] for r in rows]),
        "mean_cpu_seconds": _mean([r["cpu_seconds"] for r in rows]),
        "mean_seconds": _mean([r["seconds"] for r in rows]),
    }


def results_from(cfg: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
    a = cfg["attack"]
    table = [
        table_line(name, b, group)
        for name in a["names"]
        for b in a["batch-sizes"]
        if (group := [r for r in rows if r["attack"] == name and r["batch_size"] == b])
    ]
    summary = [
        f"{t['attack']} at B={t['batch_size']}: PSNR {t['mean_psnr']:.1f} dB (mean of "
        f"{t['batches']} batches), SSIM {t['mean_ssim']:.3f}, {t['images_at_30db']} images at "
        f">= {SUCCESS_DB:g} dB, labels {t['label_accuracy']:.0%}, {t['mean_cpu_seconds']:.0f} s "
        "CPU per batch."
        for t in table
    ]
    return {
        "title": "DLG, iDLG and Inverting Gradients by batch size (sigmoid LeNet, CIFAR-10)",
        "summary": summary,
        "rows": rows,
        "table": table,
    }


def run(cfg: dict[str, Any], run: RunFolder) -> dict[str, Any]:
    torch.set_num_threads(int(cfg["attack"]["threads"]))
    a, batches = cfg["attack"], int(cfg["data"]["batches"])
    sizes = [int(b) for b in a["batch-sizes"]]
    images, labels, indices = private_batches(cfg, batches * sum(sizes))
    torch.manual_seed(int(cfg["model"]["seed"]))
    model = dlg_lenet(10)
    rows: list[dict] = []
    start = 0
    for b in sizes:
        for j in range(batches):
            part = slice(start, start + b)
            start += b
            x, y = images[part], labels[part]
            recons = {}
            for name in a["names"]:
                row, recons[name] = attack_batch(name, cfg, model, x, y, int(cfg["seed"]) + j)
                rows.append({**row, "batch": j, "indices": indices[part]})
                print(
                    f"[batch-sizes] {name} B={b} batch {j + 1}/{batches}: PSNR "
                    f"{row['psnr']:.1f} dB, labels {row['label_accuracy']:.0%}, "
                    f"{row['cpu_seconds']:.0f} s CPU",
                    flush=True,
                )
                write_results(run, results_from(cfg, rows))  # a killed run keeps its rows
            if j == 0:
                for name, recon in recons.items():
                    save_comparison_grid(
                        x,
                        recon,
                        run.path / "grids" / f"{name}-b{b}.png",
                        labels=("original", name),
                        scale=2,
                    )
    results = results_from(cfg, rows)
    by = {(t["attack"], t["batch_size"]): t for t in results["table"]}
    for metric, label in (("mean_psnr", "PSNR (dB)"), ("mean_cpu_seconds", "CPU s per batch")):
        save_line_plot(
            run.path / "plots" / f"{metric}-vs-batch-size.png",
            [
                (name, [float(b) for b in sizes], [by[(name, b)][metric] for b in sizes])
                for name in a["names"]
            ],
            title=f"{label} by batch size",
            xlabel="batch size",
            ylabel=label,
            hline=(SUCCESS_DB, f"{SUCCESS_DB:g} dB") if metric == "mean_psnr" else None,
        )
    write_results(run, results)
    return results
