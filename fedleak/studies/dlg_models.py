"""Study ``dlg-models``: DLG against LeNet, ResNet-18, DenseNet-121 and Inception-v3.

The DLG slides (``shared/papers/dlg-deep-leakage-from-gradients-model-study.txt``) attack four
randomly initialised networks with ReLU swapped for Sigmoid, one image at a time, with DLG's
L-BFGS (lr 1, history 100, 20 inner iterations per step), and plot the image MSE against the
L-BFGS step. Their table: LeNet 32x32 converges in about 100 steps; ResNet-18 (224x224) needs
more than 300; DenseNet-121 (224x224) converges in about 50 but, like ResNet-18, at an MSE an
order above LeNet's; Inception-v3 (299x299) does not converge in 300 steps.

Here each model sees the same CIFAR-10 test images, resized to the model's ``image-size``
(``models.paper-sizes = true`` restores the table's sizes, far beyond a CPU's budget). Per image:
the FedSGD gradient (batch 1) of a fresh model, DLG (soft labels) or iDLG (closed-form label),
and the pixel MSE on [0, 1] after every L-BFGS step; steps-to-converge is the first step with
MSE below ``attack.converge-mse``. The ground truth is used only for scoring.

Choices that matter, all in the preset: ``bn = "train"`` computes the client's gradient with
batch statistics as a training client does (ResNet/DenseNet/Inception have BatchNorm);
Inception-v3 then needs inputs of at least 107x107 for a batch of one (its last maps must be
larger than 1x1). Dropout is always off: its mask is private randomness that no attacker can
replay, so with it the study would measure the mask, not the architecture. ``input`` is what
the network receives: ``unit`` ([0, 1], DLG's LeNet), ``imagenet`` (the slides' normalisation
for the torchvision models) or ``raw`` ([-1, 1]); the attack always optimises [-1, 1] images
and the transform (``fedleak.models.leakage.InputTransform``) is part of the model.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedleak.attacker.inversion import fedsgd_update, get_attack
from fedleak.data import load_dataset
from fedleak.metrics.images import mse, score_batch
from fedleak.models.leakage import INPUTS, build_leakage_model
from fedleak.report.grids import save_comparison_grid
from fedleak.report.plots import save_line_plot
from fedleak.runfolder import RunFolder
from fedleak.studies import write_results

PAPER_IMAGE_SIZES = {"lenet": 32, "resnet18": 224, "densenet121": 224, "inception_v3": 299}

# A setting that runs in a few seconds (tests, smoke checks): two images, LeNet only.
TINY_OVERRIDES = [
    'models.names=["lenet"]',
    "data.images=2",
    "models.lenet.images=2",
    "models.lenet.steps=4",
]


def build_model(name: str, settings: dict[str, Any], sigmoid: bool, channels: int) -> nn.Module:
    """The network the client trains, with its input transform in front and dropout off.

    Built by ``build_leakage_model`` as the federation's ``dlg-lenet`` is, so LeNet with
    ``input = "unit"`` is the same function of the same weights in both.
    """
    model = build_leakage_model(
        name, 10, channels, settings["image-size"], sigmoid=sigmoid, input=settings["input"]
    )
    model.train(settings["bn"] == "train")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()  # see the module docstring: the mask would be unobservable noise
    return model


def pick_images(cfg: dict[str, Any], seed: int) -> tuple[Tensor, Tensor, list[int]]:
    """The study's images (N x C x 32 x 32 in [-1, 1]), labels and their dataset indices."""
    data = cfg["data"]
    dataset = load_dataset(data["dataset"], data["split"], data["root"] or None)
    if data["indices"]:
        indices = [int(i) for i in data["indices"]]
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        indices = order[: data["images"]].tolist()
    return dataset.images[indices], dataset.labels[indices], indices


def resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size:
        return images.clone()
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return out.clamp(-1, 1)


class CurveRecorder:
    """The attack's callback: pixel MSE after every step, and the per-image time budget.

    DLG restarts L-BFGS from a fresh point after a divergence; the curve goes on through it
    (the jump shows where), and the returned images are from the last attempt.
    """

    def __init__(self, original: Tensor, max_seconds: float) -> None:
        self.original = original
        self.max_seconds = max_seconds
        self.start = time.perf_counter()
        self.mse: list[float] = []
        self.loss: list[float] = []
        self.stopped_by_budget = False

    def __call__(self, step: int, loss: Tensor, images: Tensor, _ids: list[int]) -> bool:
        self.mse.append(float(mse(images[0], self.original).mean()))
        self.loss.append(float(loss.float().sum()))
        if self.max_seconds > 0 and time.perf_counter() - self.start > self.max_seconds:
            self.stopped_by_budget = True
            return True
        return False


def first_below(values: list[float], threshold: float) -> int | None:
    """1-based step of the first value below ``threshold``, or None."""
    return next((i + 1 for i, v in enumerate(values) if v < threshold), None)


def attack_one(
    model: nn.Module,
    image: Tensor,
    label: Tensor,
    settings: dict[str, Any],
    attack_cfg: dict[str, Any],
    generator: torch.Generator,
) -> tuple[dict[str, Any], Tensor, CurveRecorder]:
    """DLG on one image: (row of scores, reconstruction, recorded curve)."""
    observation = fedsgd_update(model, image, label)
    attack = get_attack(
        attack_cfg["name"],
        iterations=settings["steps"],
        lbfgs_max_iter=attack_cfg["lbfgs-max-iter"],
    )
    recorder = CurveRecorder(image, settings["max-seconds"])
    rec = attack.reconstruct(model, observation, generator=generator, callback=recorder)
    score = score_batch(rec.images, image, rec.labels, label)
    grey = float(mse(torch.zeros_like(image), image).mean())  # a guess with no information
    steps = len(recorder.mse)
    converged_at = first_below(recorder.mse, attack_cfg["converge-mse"])
    row = {
        "label": int(label[0]),
        "recovered_label": int(rec.labels[0]),
        "label_ok": bool(score["label_accuracy"] == 1.0),
        "steps_run": steps,
        "steps_to_converge": converged_at,
        "final_mse": score["mse"],
        "min_mse": min(recorder.mse) if recorder.mse else None,
        "grey_mse": grey,
        "psnr": score["psnr"],
        "ssim": score["ssim"],
        "seconds": round(rec.seconds, 2),
        "seconds_per_step": round(rec.seconds / max(1, steps), 3),
        "attempts": rec.resets + 1,
        "evaluations": rec.evaluations,
        "stopped_by_budget": recorder.stopped_by_budget,
        "gradient_norm": float(torch.sqrt(sum(u.pow(2).sum() for u in observation.update))),
    }
    return row, rec.images, recorder


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def aggregate(model: str, settings: dict[str, Any], rows: list[dict], params: int) -> dict:
    """One line of the table: a model over its images."""
    converged = [r["steps_to_converge"] for r in rows if r["steps_to_converge"] is not None]
    return {
        "model": model,
        "image_size": settings["image-size"],
        "parameters": params,
        "bn": settings["bn"],
        "input": settings["input"],
        "images": len(rows),
        "converged": f"{len(converged)}/{len(rows)}",
        "median_steps_to_converge": statistics.median(converged) if converged else None,
        "median_final_mse": statistics.median(r["final_mse"] for r in rows),
        "mean_final_mse": _mean([r["final_mse"] for r in rows]),
        "mean_min_mse": _mean([r["min_mse"] for r in rows]),
        "median_grey_mse": statistics.median(r["grey_mse"] for r in rows),
        "mean_psnr": _mean([r["psnr"] for r in rows]),
        "mean_ssim": _mean([r["ssim"] for r in rows]),
        "label_accuracy": _mean([1.0 if r["label_ok"] else 0.0 for r in rows]),
        "mean_seconds": _mean([r["seconds"] for r in rows]),
        "seconds_per_step": _mean([r["seconds_per_step"] for r in rows]),
        "budget_stops": sum(r["stopped_by_budget"] for r in rows),
    }


def _model_sentence(line: dict, threshold: float) -> str:
    steps = line["median_steps_to_converge"]
    conv = f"median step {steps:g}" if steps is not None else "none did"
    text = (
        f"{line['model']} ({line['image_size']}x{line['image_size']}, "
        f"{line['parameters']:,} parameters): {line['converged']} images reached MSE < "
        f"{threshold:g} ({conv}); final MSE median {line['median_final_mse']:.3g}, "
        f"mean {line['mean_final_mse']:.3g} "
        f"(a uniform grey guess: median {line['median_grey_mse']:.3g}), "
        f"PSNR {line['mean_psnr']:.1f} dB, "
        f"SSIM {line['mean_ssim']:.3f}, labels {line['label_accuracy']:.0%}, "
        f"{line['seconds_per_step']:.2f} s per step"
    )
    if line["budget_stops"]:
        text += f"; {line['budget_stops']} image(s) stopped by the time budget"
    return text + "."


def slides_check(table: list[dict]) -> str | None:
    """Whether the slides' ordering holds in ``table`` (None unless all four models ran).

    Medians over images, since one DLG run can stall far from the image while the others
    converge. "Leaks" means ending below the MSE of a uniform grey guess, which knows nothing
    about the image.
    """
    by = {line["model"]: line for line in table}
    if set(by) != set(PAPER_IMAGE_SIZES):
        return None
    lenet, res, dense, inc = (by[m] for m in ("lenet", "resnet18", "densenet121", "inception_v3"))
    n_conv, n_all = (int(v) for v in lenet["converged"].split("/"))
    deep = (res, dense)
    checks = {
        "LeNet converges on most images": 2 * n_conv > n_all,
        "ResNet-18 and DenseNet-121 end above LeNet's MSE": min(m["median_final_mse"] for m in deep)
        > lenet["median_final_mse"],
        "ResNet-18 and DenseNet-121 leak (end below a grey guess's MSE)": all(
            m["median_final_mse"] < m["median_grey_mse"] for m in deep
        ),
        "Inception-v3 ends with the highest MSE": inc["median_final_mse"]
        >= max(m["median_final_mse"] for m in (lenet, *deep)),
    }
    failed = [claim for claim, ok in checks.items() if not ok]
    if not failed:
        return "The slides' ordering is reproduced at these sizes: " + "; ".join(checks) + "."
    held = [claim for claim, ok in checks.items() if ok]
    return (
        "The slides' ordering is not fully reproduced at these sizes. Fails: "
        + "; ".join(failed)
        + ". Holds: "
        + ("; ".join(held) or "none")
        + "."
    )


def _save_plots(run: RunFolder, curves: dict[str, list[dict]], threshold: float) -> None:
    for model, items in curves.items():
        save_line_plot(
            run.path / "plots" / f"mse-{model}.png",
            [(f"image {c['index']}", list(range(1, len(c["mse"]) + 1)), c["mse"]) for c in items],
            title=f"DLG on {model}: image MSE per L-BFGS step",
            xlabel="L-BFGS step",
            ylabel="MSE on [0, 1]",
            logy=True,
            hline=(threshold, f"converged (MSE < {threshold:g})"),
        )
    series = []
    for model, items in curves.items():
        if not items:
            continue
        length = min(len(c["mse"]) for c in items)
        median = [statistics.median(c["mse"][s] for c in items) for s in range(length)]
        series.append((f"{model} (median of {len(items)})", list(range(1, length + 1)), median))
    save_line_plot(
        run.path / "plots" / "mse-all-models.png",
        series,
        title="DLG: median image MSE per L-BFGS step",
        xlabel="L-BFGS step",
        ylabel="MSE on [0, 1]",
        logy=True,
        hline=(threshold, f"converged (MSE < {threshold:g})"),
    )


def model_settings(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    settings = dict(cfg["models"][name])
    if cfg["models"]["paper-sizes"]:
        settings["image-size"] = PAPER_IMAGE_SIZES[name]
    return settings


def validate(cfg: dict[str, Any]) -> None:
    """Reject unknown models, attacks, input transforms and BatchNorm modes before running."""
    if cfg["attack"]["name"] not in ("dlg", "idlg"):
        raise ValueError(f"attack.name must be dlg or idlg, got {cfg['attack']['name']!r}")
    for name in cfg["models"]["names"]:
        if name not in PAPER_IMAGE_SIZES:
            raise ValueError(f"unknown model {name!r} (known: {', '.join(PAPER_IMAGE_SIZES)})")
        settings = model_settings(cfg, name)
        if settings["input"] not in INPUTS:
            raise ValueError(f"models.{name}.input must be one of {', '.join(INPUTS)}")
        if settings["bn"] not in ("train", "eval"):
            raise ValueError(f"models.{name}.bn must be train or eval, got {settings['bn']!r}")


def results_from(cfg: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
    """results.json's content from the per-image rows (the table and summary are derived)."""
    threshold = float(cfg["attack"]["converge-mse"])
    table = []
    for name in cfg["models"]["names"]:
        model_rows = [r for r in rows if r["model"] == name]
        if model_rows:
            settings = model_settings(cfg, name)
            table.append(aggregate(name, settings, model_rows, model_rows[0]["parameters"]))
    summary = [_model_sentence(line, threshold) for line in table]
    if table:
        by_mse = sorted(table, key=lambda line: line["median_final_mse"])
        summary.append(
            "Ordering by median final MSE (lowest = most leakage): "
            + " < ".join(f"{line['model']} ({line['median_final_mse']:.3g})" for line in by_mse)
            + "."
        )
    check = slides_check(table)
    if check:
        summary.append(check)
    return {
        "title": f"DLG model study ({cfg['attack']['name']}, batch 1, CIFAR-10)",
        "summary": summary,
        "rows": rows,
        "table": table,
    }


def run(cfg: dict[str, Any], run: RunFolder) -> dict[str, Any]:
    torch.set_num_threads(cfg["attack"]["threads"])
    seed = int(cfg["seed"])
    validate(cfg)
    names = list(cfg["models"]["names"])
    images, labels, indices = pick_images(cfg, seed)
    rows: list[dict] = []
    curves: dict[str, list[dict]] = {}
    for name in names:
        settings = model_settings(cfg, name)
        count = min(settings["images"], len(indices))
        originals, recons = [], []
        curves[name] = []
        for i in range(count):
            x = resize(images[i : i + 1], settings["image-size"])
            torch.manual_seed(seed)  # every image attacks the same freshly initialised model
            model = build_model(name, settings, cfg["models"]["sigmoid"], x.shape[1])
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            row, recon, recorder = attack_one(
                model, x, labels[i : i + 1], settings, cfg["attack"], gen
            )
            params = sum(p.numel() for p in model.parameters())
            rows.append({"model": name, "index": indices[i], "parameters": params, **row})
            print(
                f"[dlg-models] {name} image {i + 1}/{count} (index {indices[i]}): "
                f"final MSE {row['final_mse']:.3g}, converged at {row['steps_to_converge']}, "
                f"{row['seconds']:.0f} s",
                flush=True,
            )
            curves[name].append(
                {
                    "index": indices[i],
                    "label": row["label"],
                    "mse": recorder.mse,
                    "loss": recorder.loss,
                }
            )
            originals.append(x)
            recons.append(recon)
            # After every image, so that a killed run keeps what it measured.
            run.write_json("curves.json", curves)
            write_results(run, results_from(cfg, rows))
        if originals:
            save_comparison_grid(
                torch.cat(originals),
                torch.cat(recons),
                run.path / "grids" / f"{name}.png",
                labels=("original", f"{cfg['attack']['name']}"),
                scale=max(1, 64 // settings["image-size"]),
            )
        _save_plots(run, curves, float(cfg["attack"]["converge-mse"]))
    results = results_from(cfg, rows)
    write_results(run, results)
    return results
