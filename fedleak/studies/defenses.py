"""Study ``inversion-defenses``: how much each update defense stops gradient inversion.

Setting: DLG's sigmoid LeNet at initialisation (the most leaky model of the DLG study), private
CIFAR-10 test batches, FedSGD. The client's gradient goes through ``clients.defenses`` (top-k
sparsification, Gaussian noise, global-norm clipping); the attacker inverts the defended update
without modelling the defense. One axis at a time from the undefended batch-1 baseline: batch
size (labels recovered from the last layer for B > 1), top-k fraction kept, noise sigma, clip
bound. Every setting attacks the same private batches from the same random starts, so the
settings are compared on paired images.

Attack: iDLG by default (DLG's L-BFGS on the L2 gradient distance, label from the closed form).
Measured on this model (the federation's ``dlg-lenet``, [0, 1] input), batch 1, median of 20
held-out CIFAR-10 images: iDLG 53.7 dB after 100 L-BFGS steps (54.9 after 300); Inverting
Gradients (Adam, cosine + TV, 4 restarts) 26.4 dB after 1000 iterations, 34.9 after its 4800.
iDLG is what lets 18 settings fit in a few CPU-minutes, and the L2 distance is what Zhu et al.
evaluated defenses with. Its blind spot is scale: clipping only rescales an update, so L2
"fails" for a reason a cosine attacker (scale-invariant, Geiping et al.) does not share; clip
settings therefore run with every distance in ``sweep.clip-distances``. With one image iDLG
takes the size of ``p - y`` from the observed bias gradient (``seed="auto"``), which clipping
scales with the rest of the update, so at batch 1 clipping no longer misleads it. The attacker
does not model top-k either (it could mask its simulated gradient with the zero pattern it
sees), so top-k numbers are an upper bound on that defense's strength. ``attack.name`` may also
be ``dlg`` or ``inverting-gradients``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedleak.attacker.inversion import ATTACKS, fedsgd_update, get_attack
from fedleak.attacker.inversion.objectives import DISTANCES
from fedleak.data import load_dataset
from fedleak.defenses import apply_defenses, global_norm, parse_defenses
from fedleak.metrics.images import score_batch
from fedleak.models.leakage import dlg_lenet
from fedleak.report.grids import save_comparison_grid
from fedleak.report.plots import save_line_plot
from fedleak.runfolder import RunFolder
from fedleak.studies import write_results

# A setting that runs in seconds (tests): one batch, a few steps, one value per axis.
TINY_OVERRIDES = [
    "data.batches=1",
    "attack.steps=3",
    "sweep.batch-sizes=[1,2]",
    "sweep.topk=[0.1]",
    "sweep.noise=[0.01]",
    "sweep.clip=[1.0]",
    'sweep.clip-distances=["l2"]',
]


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a defense chain, a batch size and the attack's distance."""

    defense: str
    batch_size: int
    distance: str

    @property
    def name(self) -> str:
        return f"{self.defense} B={self.batch_size} {self.distance}"

    @property
    def slug(self) -> str:
        text = f"{self.defense}-b{self.batch_size}-{self.distance}"
        return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


@dataclass(frozen=True)
class Axis:
    """A sweep axis for the plot: its settings and their strengths (x values).

    On a log axis the undefended point (x = 0 for noise, inf for clipping) cannot be drawn; it
    becomes a dashed "no defense" line.
    """

    slug: str
    name: str
    xlabel: str
    points: tuple[tuple[float, Setting], ...]
    logx: bool = True


def build_axes(cfg: dict[str, Any]) -> list[Axis]:
    """The sweep as axes from the undefended batch-1 baseline (see the module docstring)."""
    sweep, distance = cfg["sweep"], cfg["attack"]["distance"]
    base = Setting("none", 1, distance)
    axes = [
        Axis(
            "batch",
            "batch size",
            "batch size (no defense)",
            tuple((float(b), replace(base, batch_size=int(b))) for b in sweep["batch-sizes"]),
            logx=False,
        ),
        Axis(
            "topk",
            "top-k sparsification",
            "fraction of each layer's entries kept (1 = no defense)",
            ((1.0, base),)
            + tuple((f, replace(base, defense=f"topk:{f:g}")) for f in sweep["topk"]),
        ),
        Axis(
            "noise",
            "Gaussian noise",
            "noise sigma per entry",
            ((0.0, base),)
            + tuple((s, replace(base, defense=f"noise:{s:g}")) for s in sweep["noise"]),
        ),
    ]
    for d in sweep["clip-distances"]:
        undefended = Setting("none", 1, d)
        clipped = tuple((c, Setting(f"clip:{c:g}", 1, d)) for c in sweep["clip"])
        axes.append(
            Axis(
                f"clip-{d}",
                f"norm clipping ({d} attack)",
                "global L2 clip bound C",
                ((math.inf, undefended),) + clipped,
            )
        )
    for axis in axes:
        for _, setting in axis.points:
            parse_defenses(setting.defense)  # a bad value stops the study before any attack
    return axes


def unique_settings(axes: list[Axis]) -> list[Setting]:
    seen: dict[Setting, None] = {}
    for axis in axes:
        for _, setting in axis.points:
            seen.setdefault(setting)
    return list(seen)


def private_batch(perm: torch.Tensor, batch_size: int, j: int) -> torch.Tensor:
    """Indices of private batch ``j`` of size ``batch_size``: consecutive slices of ``perm``."""
    return perm[j * batch_size : (j + 1) * batch_size]


def attack_setting(
    model: torch.nn.Module,
    setting: Setting,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: dict[str, Any],
    j: int,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Defend the batch's gradient, invert and score it: (row, reconstructions, paired order)."""
    seed, attack_cfg = int(cfg["seed"]), cfg["attack"]
    observation = fedsgd_update(model, images, labels)
    noise_gen = torch.Generator().manual_seed(seed * 100_003 + j)
    defended = apply_defenses(observation.update, setting.defense, noise_gen)
    distortion = global_norm([d - u for d, u in zip(defended, observation.update, strict=True)])
    attack = get_attack(
        attack_cfg["name"],
        iterations=attack_cfg["steps"],
        distance=setting.distance,
        restarts=attack_cfg["restarts"],
    )
    rec = attack.reconstruct(
        model,
        replace(observation, update=defended),
        generator=torch.Generator().manual_seed(seed * 1000 + j),
    )
    score = score_batch(rec.images, images, rec.labels, labels)
    row = {
        "setting": setting.name,
        "defense": setting.defense,
        "batch_size": setting.batch_size,
        "distance": setting.distance,
        "batch": j,
        "psnr": score["psnr"],
        "ssim": score["ssim"],
        "mse": score["mse"],
        "label_accuracy": score["label_accuracy"],
        "min_psnr": min(score["psnr_per_image"]),
        "max_psnr": max(score["psnr_per_image"]),
        "update_norm": float(global_norm(observation.update)),
        "relative_distortion": float(distortion / global_norm(observation.update)),
        "seconds": round(rec.seconds, 2),
        "steps": rec.iterations,
        "resets": rec.resets,
    }
    return row, rec.images[torch.as_tensor(score["order"])]


def summarise(setting: Setting, rows: list[dict]) -> dict[str, Any]:
    """The table line of one setting, over its private batches (images weighted by batch)."""
    psnrs = [r["psnr"] for r in rows if math.isfinite(r["psnr"])]
    return {
        "setting": setting.name,
        "defense": setting.defense,
        "batch_size": setting.batch_size,
        "distance": setting.distance,
        "batches": len(rows),
        "mean_psnr": statistics.fmean(psnrs) if psnrs else None,
        "mean_ssim": statistics.fmean(r["ssim"] for r in rows),
        "label_accuracy": statistics.fmean(r["label_accuracy"] for r in rows),
        "min_psnr": min(r["min_psnr"] for r in rows),
        "relative_distortion": statistics.fmean(r["relative_distortion"] for r in rows),
        "mean_seconds": statistics.fmean(r["seconds"] for r in rows),
    }


def _sentence(axis: Axis, lines: dict[Setting, dict]) -> str:
    parts = []
    for _, setting in axis.points:
        line = lines[setting]
        label = f"B={setting.batch_size}" if axis.slug == "batch" else setting.defense
        parts.append(
            f"{label}: {line['mean_psnr']:.1f} dB / SSIM {line['mean_ssim']:.2f} / "
            f"labels {line['label_accuracy']:.0%}"
        )
    return f"{axis.name}: " + "; ".join(parts) + "."


def _plot(run: RunFolder, axis: Axis, lines: dict[Setting, dict]) -> None:
    drawable = [(x, s) for x, s in axis.points if not axis.logx or 0 < x < math.inf]
    undefended = [s for x, s in axis.points if axis.logx and not 0 < x < math.inf]
    xs = [x for x, _ in drawable]
    save_line_plot(
        run.path / "plots" / f"psnr-vs-{axis.slug}.png",
        [
            ("mean PSNR", xs, [lines[s]["mean_psnr"] for _, s in drawable]),
            ("worst image PSNR", xs, [lines[s]["min_psnr"] for _, s in drawable]),
        ],
        title=f"Inversion vs {axis.name}",
        xlabel=axis.xlabel,
        ylabel="PSNR (dB)",
        logx=axis.logx,
        hline=(lines[undefended[0]]["mean_psnr"], "no defense") if undefended else None,
    )


def validate(cfg: dict[str, Any]) -> None:
    """Reject an unknown attack, distance or defense value before running."""
    if cfg["attack"]["name"] not in ATTACKS:
        raise ValueError(f"attack.name must be one of {', '.join(sorted(ATTACKS))}")
    for d in [cfg["attack"]["distance"], *cfg["sweep"]["clip-distances"]]:
        if d not in DISTANCES:
            raise ValueError(f"unknown distance {d!r} (known: {', '.join(sorted(DISTANCES))})")
    build_axes(cfg)


def run(cfg: dict[str, Any], run: RunFolder) -> dict[str, Any]:
    torch.set_num_threads(cfg["attack"]["threads"])
    seed = int(cfg["seed"])
    validate(cfg)
    axes = build_axes(cfg)
    settings = unique_settings(axes)
    data = cfg["data"]
    dataset = load_dataset(data["dataset"], data["split"], data["root"] or None)
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = dlg_lenet(len(dataset.classes))  # the federation's dlg-lenet, [0, 1] input
    rows: list[dict] = []
    lines: dict[Setting, dict] = {}
    for k, setting in enumerate(settings, 1):
        setting_rows, originals, recons = [], [], []
        for j in range(data["batches"]):
            idx = private_batch(perm, setting.batch_size, j)
            row, recon = attack_setting(
                model, setting, dataset.images[idx], dataset.labels[idx], cfg, j
            )
            setting_rows.append(row)
            originals.append(dataset.images[idx])
            recons.append(recon)
        rows += setting_rows
        lines[setting] = summarise(setting, setting_rows)
        print(
            f"[inversion-defenses] {k}/{len(settings)} {setting.name}: "
            f"{lines[setting]['mean_psnr']:.1f} dB, SSIM {lines[setting]['mean_ssim']:.3f}, "
            f"labels {lines[setting]['label_accuracy']:.0%}",
            flush=True,
        )
        save_comparison_grid(
            torch.cat(originals),
            torch.cat(recons),
            run.path / "grids" / f"{k:02d}-{setting.slug}.png",
            labels=("original", setting.name),
            scale=3,
        )
        write_results(run, _results(cfg, rows, list(lines.values()), []))  # partial, if killed
    for axis in axes:
        _plot(run, axis, lines)
    summary = [_sentence(axis, lines) for axis in axes]
    results = _results(cfg, rows, list(lines.values()), summary)
    write_results(run, results)
    return results


def _results(cfg: dict, rows: list[dict], table: list[dict], summary: list[str]) -> dict:
    attack = cfg["attack"]
    return {
        "title": (
            f"Update defenses vs {attack['name']} ({attack['steps']} steps), sigmoid LeNet, "
            f"CIFAR-10, {cfg['data']['batches']} private batches per setting"
        ),
        "summary": summary,
        "rows": rows,
        "table": table,
    }
