"""Study ``gias-vs-ig``: a generative prior against pixel search, at the same iteration budget.

Jeon et al. (NeurIPS'21, Sec. 5.1, Figures 3-4) compare search spaces: pixels (GI-x, Inverting
Gradients), the latent code of a pretrained generator (GI-z), and the latent code then the
generator's parameters (GI-zw, GIAS). Here, per victim image:

- victim: DLG's sigmoid LeNet (1 channel, untrained, seed ``model.seed``), FedSGD with batch 1,
  so each image is inverted on its own and labels are exact (iDLG) for every method;
- prior: a DCGAN the attacker trains on auxiliary data disjoint from the victims (MNIST train
  split for victims from the test split; faces of people 1-30 for victims among people 31-40);
- every method gets ``attack.iterations`` Adam iterations and ``attack.restarts`` batched starts,
  keeping the restart with the lowest final cost (which the attacker can compute). GIAS splits
  its budget ``latent-share`` / rest between its stages.

Equal iterations is the paper's axis (Figure 3); an iteration of GIAS costs more time than one
of pixel search (a generator pass), so seconds are reported too. The ground truth enters only
the scoring: PSNR/SSIM/MSE of the final images, and a PSNR curve of the attacker's current pick
every ``eval-every`` iterations. Optionally (``"giml"`` in ``attack.methods``) a fourth method:
GIAS with a generator meta-learned by GIML from other clients' updates only, starting untrained;
``"gias-untrained"`` (GIAS on that untrained generator: how much the prior itself brings) and
``"ig-long"`` (Inverting Gradients with ``ig-long-iterations``) are references.

Measured (MNIST, the 8 default victims, 4 restarts, mean PSNR / SSIM; seconds on a shared
2-core machine, 1 thread): at 1000 iterations IG 22.3 dB / 0.67 (8.9 s per image), latent only
24.1 / 0.91 (14.7 s), GIAS 32.1 / 0.94 (16.1 s), GIAS better on 8/8 images; the preset ran in
5.3 min with the prior cached (training it: ~3 min). At 2000 iterations IG 34.7, latent only
26.3, GIAS 41.0. Caveats: IG with 2000 iterations (about GIAS's time for 1000) beats GIAS at
1000 (34.7 vs 32.1 dB, SSIM 0.84 vs 0.94). With the paper's parameter learning rate 1e-3, GIAS
on an untrained DCGAN reaches 33.7 dB at 1000 iterations (the generator architecture's implicit
prior); at 3e-4, GIAS with the pretrained prior gives 38.7 dB and the untrained one 26.6 (the
first Adam steps at 1e-3 visibly knock the pretrained generator off its latent-stage image).
GIAS with a GIML prior (48 Reptile steps over 24 updates, no data): 38.0 dB / 0.99.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from fedleak.attacker.inversion import (
    GIAS,
    GenerativeConfig,
    GIMLConfig,
    LatentSearch,
    Observation,
    OptimizationAttack,
    fedsgd_update,
    get_attack,
    meta_learn_generator,
    train_dcgan_prior,
)
from fedleak.attacker.inversion.giml import untrained_generator
from fedleak.data import load_dataset, num_classes
from fedleak.metrics.images import psnr, score_batch
from fedleak.models.leakage import SigmoidLeNet
from fedleak.report.grids import save_image_grid
from fedleak.report.plots import save_line_plot
from fedleak.runfolder import RunFolder, atomic_write_bytes
from fedleak.studies import write_results

METHOD_NAMES = {
    "ig": "Inverting Gradients (GI-x, pixels)",
    "gi-latent": "latent only (GI-z)",
    "gias": "GIAS (GI-z, then GI-w)",
    "giml": "GIAS with a GIML prior",
    "ig-long": "Inverting Gradients, longer budget (reference)",
    "gias-untrained": "GIAS with an untrained generator (GIML's start, ablation)",
}
DEFAULT_WIDTHS = {32: [128, 64, 32], 64: [256, 128, 64, 32]}
FACES_PRIOR_PEOPLE = 30  # faces: the prior sees people 0-29, the victims are among 30-39

# A setting that runs in seconds (tests, smoke checks): 2 images, a tiny prior, 10 iterations.
TINY_OVERRIDES = [
    "data.images=2",
    "attack.iterations=10",
    "attack.restarts=2",
    "attack.eval-every=5",
    "prior.steps=5",
    "prior.widths=[16, 8, 4]",
]


# --- data ------------------------------------------------------------------------------------


def split_data(cfg: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, list[int], Tensor, Tensor]:
    """(prior images, victims, victim labels, victim indices, spare images, spare labels).

    Victims: the first image of each class in turn; indices are into the victims' split (MNIST
    test, faces "all"). Spare images (same pool, never a victim)
    stand in for other clients, whose updates GIML learns from.
    """
    data = cfg["data"]
    root = data["root"] or None
    if data["dataset"] == "mnist":
        prior_images = load_dataset("mnist", "train", root).images
        pool = load_dataset("mnist", "test", root)
        split_index = list(range(len(pool)))
    elif data["dataset"] == "faces":
        faces = load_dataset("faces", "all", root)
        prior_images = faces.images[faces.labels < FACES_PRIOR_PEOPLE]
        keep = torch.nonzero(faces.labels >= FACES_PRIOR_PEOPLE).flatten()
        pool = faces.subset(keep.numpy())
        split_index = keep.tolist()
    else:
        raise ValueError(f"data.dataset must be mnist or faces, got {data['dataset']!r}")
    classes = sorted(set(pool.labels.tolist()))
    by_class = {c: torch.nonzero(pool.labels == c).flatten().tolist() for c in classes}
    chosen: list[int] = []
    for i in range(int(data["images"])):
        members = by_class[classes[i % len(classes)]]
        rank = i // len(classes)
        if rank >= len(members):
            raise ValueError(f"not enough images per class for {data['images']} victims")
        chosen.append(members[rank])
    spare = [i for i in range(len(pool)) if i not in set(chosen)]
    return (
        prior_images,
        pool.images[chosen],
        pool.labels[chosen],
        [split_index[i] for i in chosen],
        pool.images[spare],
        pool.labels[spare],
    )


def victim_model(cfg: dict[str, Any], image: Tensor, num_classes: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["model"]["seed"]))
        return SigmoidLeNet(num_classes, in_channels=image.shape[1], image_size=image.shape[-1])


# --- attacks ---------------------------------------------------------------------------------


def build_attacks(cfg: dict[str, Any], priors: dict[str, nn.Module]) -> dict:
    """The methods of ``attack.methods``, by name; ``priors`` holds the generators they need
    (``pretrained``, ``giml``, ``untrained``)."""
    a = cfg["attack"]
    total, restarts, tv = int(a["iterations"]), int(a["restarts"]), float(a["tv-weight"])
    latent = round(total * float(a["latent-share"]))
    shared = {"restarts": restarts, "tv_weight": tv, "latent_lr": float(a["latent-lr"])}
    methods = list(a["methods"])
    unknown = sorted(set(methods) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} (known: {', '.join(METHOD_NAMES)})")

    def ig(iterations: int) -> OptimizationAttack:
        return get_attack(
            "inverting-gradients",
            iterations=iterations,
            restarts=restarts,
            tv_weight=tv,
            lr=float(a["ig-lr"]),
        )

    def gias(prior: nn.Module) -> GIAS:
        stages = {"latent_iterations": latent, "param_iterations": total - latent}
        return GIAS(prior, param_lr=float(a["param-lr"]), **stages, **shared)

    makers = {
        "ig": lambda: ig(total),
        "ig-long": lambda: ig(int(a["ig-long-iterations"])),
        "gi-latent": lambda: LatentSearch(priors["pretrained"], latent_iterations=total, **shared),
        "gias": lambda: gias(priors["pretrained"]),
        "giml": lambda: gias(priors["giml"]),
        "gias-untrained": lambda: gias(priors["untrained"]),
    }
    return {m: makers[m]() for m in methods}


def run_giml(
    cfg: dict[str, Any],
    model: nn.Module,
    start_prior: nn.Module,
    spare: Tensor,
    spare_labels: Tensor,
    seed: int,
) -> tuple[nn.Module, list[float], float]:
    """Meta-learn a generator from ``giml.tasks`` updates of spare images (no clean data),
    starting from ``start_prior``."""
    g = cfg["giml"]
    gen = torch.Generator().manual_seed(seed + 7)
    pick = torch.randperm(len(spare), generator=gen)[: int(g["tasks"])].tolist()
    observations: list[Observation] = [
        fedsgd_update(model, spare[i : i + 1], spare_labels[i : i + 1]) for i in pick
    ]
    inner = GenerativeConfig(
        latent_iterations=int(g["latent-iterations"]),
        param_iterations=int(g["param-iterations"]),
        latent_norm_weight=1e-3,
        restarts=1,
        per_image_generator=False,
        tv_weight=float(cfg["attack"]["tv-weight"]),
    )
    meta = GIMLConfig(meta_steps=int(g["meta-steps"]), meta_lr=float(g["meta-lr"]), inner=inner)
    start = time.perf_counter()
    learned, history = meta_learn_generator(
        model, observations, meta, prior=start_prior, generator=gen
    )
    return learned, history, time.perf_counter() - start


def prepare_priors(
    cfg: dict[str, Any],
    run: RunFolder,
    prior_images: Tensor,
    model: nn.Module,
    spare: Tensor,
    spare_labels: Tensor,
    seed: int,
) -> tuple[dict[str, nn.Module], list[str]]:
    """The generators the chosen methods need, their sample grids, and a sentence on each."""
    methods, p = set(cfg["attack"]["methods"]), cfg["prior"]
    side = prior_images.shape[-1]
    z = torch.randn(32, int(p["latent-dim"]), generator=torch.Generator().manual_seed(seed))
    priors: dict[str, nn.Module] = {}
    notes: list[str] = []
    if methods & {"gias", "gi-latent"}:
        widths = tuple(int(w) for w in (p["widths"] or DEFAULT_WIDTHS[side]))
        prior = train_dcgan_prior(
            prior_images,
            steps=int(p["steps"]),
            seed=seed,
            widths=widths,
            latent_dim=int(p["latent-dim"]),
            batch_size=int(p["batch-size"]),
        )
        info = prior.prior_info
        notes.append(
            f"Prior: DCGAN {list(widths)} trained for {p['steps']} steps on {len(prior_images)} "
            "auxiliary images disjoint from the victims "
            + ("(loaded from the cache)." if info["cached"] else f"({info['seconds']:.0f} s).")
        )
        priors["pretrained"] = prior
    if methods & {"giml", "gias-untrained"}:
        # GIML's starting point, and the ablation's generator: the same untrained DCGAN.
        priors["untrained"] = untrained_generator(tuple(prior_images.shape[1:]), seed=seed)
    if "giml" in methods:
        g = cfg["giml"]
        learned, history, secs = run_giml(
            cfg, model, priors["untrained"], spare, spare_labels, seed
        )
        notes.append(
            f"GIML: {g['meta-steps']} Reptile steps over {g['tasks']} observed updates of "
            f"non-victim images, from an untrained DCGAN ({secs:.0f} s); mean inner cost "
            f"{history[0]:.3g} at the first step, {history[-1]:.3g} at the last."
        )
        priors["giml"] = learned
    for name, generator in priors.items():
        with torch.no_grad():
            samples = generator(z[:, : generator.nz])
        save_image_grid(samples, run.path / "grids" / f"prior-{name}.png", nrow=8, scale=2)
    return priors, notes


class PickRecorder:
    """Callback: PSNR of the attacker's current pick (lowest cost restart) every N iterations."""

    def __init__(self, original: Tensor, every: int) -> None:
        self.original, self.every = original, max(1, every)
        self.steps: list[int] = []
        self.psnr: list[float] = []

    def __call__(self, step: int, losses: Tensor, images: Tensor, _ids: list[int]) -> bool:
        if (step + 1) % self.every == 0:
            costs = torch.nan_to_num(losses.float(), nan=math.inf)
            best = images[int(costs.argmin())]
            self.steps.append(step + 1)
            self.psnr.append(float(psnr(best[:1], self.original)[0]))
        return False


# --- outputs ---------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def _std(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.pstdev(finite) if len(finite) > 1 else None


def aggregate(method: str, rows: list[dict], baseline: list[dict]) -> dict[str, Any]:
    by_image = {r["image"]: r["psnr"] for r in baseline}
    wins = sum(r["psnr"] > by_image.get(r["image"], math.inf) for r in rows)
    return {
        "method": method,
        "description": METHOD_NAMES[method],
        "images": len(rows),
        "iterations": rows[0]["iterations"] if rows else None,
        "mean_psnr": _mean([r["psnr"] for r in rows]),
        "std_psnr": _std([r["psnr"] for r in rows]),
        "median_psnr": statistics.median(r["psnr"] for r in rows) if rows else None,
        "mean_ssim": _mean([r["ssim"] for r in rows]),
        "mean_mse": _mean([r["mse"] for r in rows]),
        "label_accuracy": _mean([1.0 if r["label_ok"] else 0.0 for r in rows]),
        "wins_over_ig": None if method == "ig" or not baseline else f"{wins}/{len(rows)}",
        "mean_seconds": _mean([r["seconds"] for r in rows]),
        "seconds_per_iteration": _mean([r["seconds"] / r["iterations"] for r in rows]),
    }


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def save_rows_grid(path, rows: list[tuple[str, Tensor]], scale: int) -> None:
    """One labelled row of images per method (originals first), grey separators."""
    pad, margin = 2, 6
    font = _font(12)
    tiles = []
    for _, images in rows:
        x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        x = x[:, 0].numpy()  # grey images: N x H x W
        n, h, w = x.shape
        row = np.full((h + 2 * pad, n * (w + pad) + pad), 128, np.uint8)
        for i in range(n):
            row[pad : pad + h, pad + i * (w + pad) : pad + i * (w + pad) + w] = x[i]
        tiles.append(row.repeat(scale, axis=0).repeat(scale, axis=1))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_w = int(max(probe.textlength(label, font=font) for label, _ in rows)) + 2 * margin
    height = sum(t.shape[0] for t in tiles)
    canvas = Image.new("L", (label_w + max(t.shape[1] for t in tiles), height), 255)
    draw = ImageDraw.Draw(canvas)
    top = 0
    for (label, _), tile in zip(rows, tiles, strict=True):
        canvas.paste(Image.fromarray(tile, "L"), (label_w, top))
        draw.text((margin, top + tile.shape[0] // 2 - 6), label, fill=0, font=font)
        top += tile.shape[0]
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_curves(run: RunFolder, curves: dict[str, Any], switch: int) -> None:
    loss_series, psnr_series = [], []
    for method, c in curves["methods"].items():
        length = min(len(h) for h in c["loss"])
        mean_loss = [statistics.fmean(h[s] for h in c["loss"]) for s in range(length)]
        loss_series.append((METHOD_NAMES[method], list(range(1, length + 1)), mean_loss))
        steps = c["psnr_steps"]
        mean_psnr = [statistics.fmean(p[s] for p in c["psnr"]) for s in range(len(steps))]
        psnr_series.append((METHOD_NAMES[method], steps, mean_psnr))
    n = len(next(iter(curves["methods"].values()))["loss"])
    save_line_plot(
        run.path / "plots" / "loss-curves.png",
        loss_series,
        title=f"Cost of the chosen restart (mean of {n}); GIAS: G from iteration {switch}",
        xlabel="iteration",
        ylabel="1 - cos + TV",
        logy=True,
    )
    save_line_plot(
        run.path / "plots" / "psnr-curves.png",
        psnr_series,
        title=f"PSNR of the attacker's current pick (mean of {n} images)",
        xlabel="iteration",
        ylabel="PSNR (dB)",
    )


def _summary(
    cfg: dict[str, Any], table: list[dict], notes: list[str], wall: float, n: int
) -> list[str]:
    a = cfg["attack"]
    by = {line["method"]: line for line in table}
    total = int(a["iterations"])
    latent = round(total * float(a["latent-share"]))
    out = [
        f"{n} {cfg['data']['dataset']} victims, each inverted alone from one FedSGD gradient of "
        f"an untrained sigmoid LeNet; every method gets {total} Adam iterations and "
        f"{a['restarts']} restarts (GIAS: {latent} latent + {total - latent} parameter "
        "iterations"
        + (f"; the ig-long reference: {a['ig-long-iterations']}" if "ig-long" in by else "")
        + ").",
        *notes,
    ]
    for line in table:
        std = line["std_psnr"]
        out.append(
            f"{line['description']}: mean PSNR {line['mean_psnr']:.2f} dB"
            + (f" (std {std:.2f})" if std is not None else "")
            + f", SSIM {line['mean_ssim']:.3f}, MSE {line['mean_mse']:.2e}, labels "
            f"{line['label_accuracy']:.0%}, {line['mean_seconds']:.1f} s per image"
            + (f", better than IG on {line['wins_over_ig']} images" if line["wins_over_ig"] else "")
            + "."
        )
    if "gias" in by and "ig" in by:
        gap = by["gias"]["mean_psnr"] - by["ig"]["mean_psnr"]
        verdict = "beats" if gap > 0 else "does NOT beat"
        out.append(
            f"At equal iterations GIAS {verdict} pixel-space Inverting Gradients: "
            f"{by['gias']['mean_psnr']:.2f} vs {by['ig']['mean_psnr']:.2f} dB mean PSNR "
            f"({gap:+.2f} dB over {n} images)."
        )
    if "gias" in by and "ig-long" in by:
        long = by["ig-long"]
        gap = by["gias"]["mean_psnr"] - long["mean_psnr"]
        verdict = "still beats" if gap > 0 else "does NOT beat"
        out.append(
            f"Against Inverting Gradients with {long['iterations']} iterations "
            f"({long['mean_seconds']:.1f} s per image vs GIAS's {by['gias']['mean_seconds']:.1f}),"
            f" GIAS {verdict} it: {by['gias']['mean_psnr']:.2f} vs {long['mean_psnr']:.2f} dB "
            f"({gap:+.2f} dB); SSIM {by['gias']['mean_ssim']:.3f} vs {long['mean_ssim']:.3f}."
        )
    if "giml" in by and "gias-untrained" in by:
        gap = by["giml"]["mean_psnr"] - by["gias-untrained"]["mean_psnr"]
        out.append(
            f"GIML's meta-learning vs the same untrained generator without it: "
            f"{by['giml']['mean_psnr']:.2f} vs {by['gias-untrained']['mean_psnr']:.2f} dB "
            f"({gap:+.2f} dB)."
        )
    threads = torch.get_num_threads()
    out.append(f"Wall time of the study: {wall / 60:.1f} min ({threads} torch thread(s)).")
    return out


# --- the study -------------------------------------------------------------------------------


def run(cfg: dict[str, Any], run: RunFolder) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(int(cfg["attack"]["threads"]))
    seed = int(cfg["seed"])
    prior_images, victims, labels, indices, spare, spare_labels = split_data(cfg)
    side = victims.shape[-1]
    model = victim_model(cfg, victims[:1], num_classes(cfg["data"]["dataset"]))
    priors, notes = prepare_priors(cfg, run, prior_images, model, spare, spare_labels, seed)
    attacks = build_attacks(cfg, priors)

    rows: list[dict] = []
    recon: dict[str, list[Tensor]] = {m: [] for m in attacks}
    curves: dict[str, Any] = {
        "iterations": int(cfg["attack"]["iterations"]),
        "images": indices,
        "methods": {m: {"loss": [], "psnr_steps": [], "psnr": []} for m in attacks},
    }
    every = int(cfg["attack"]["eval-every"])
    for i, index in enumerate(indices):
        x, y = victims[i : i + 1], labels[i : i + 1]
        observation = fedsgd_update(model, x, y)  # all the attacker gets
        for method, attack in attacks.items():
            recorder = PickRecorder(x, every)
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            rec = attack.reconstruct(model, observation, generator=gen, callback=recorder)
            score = score_batch(rec.images, x, rec.labels, y)
            row = {
                "method": method,
                "image": index,
                "label": int(y[0]),
                "psnr": score["psnr"],
                "ssim": score["ssim"],
                "mse": score["mse"],
                "label_ok": score["label_accuracy"] == 1.0,
                "final_cost": rec.loss_history[-1] if rec.loss_history else None,
                "iterations": rec.iterations,
                "seconds": round(rec.seconds, 2),
                "restart": rec.restart,
            }
            rows.append(row)
            run.append_jsonl("rows.jsonl", row)  # a killed run keeps what it measured
            recon[method].append(rec.images)
            c = curves["methods"][method]
            c["loss"].append(rec.loss_history)
            c["psnr_steps"] = recorder.steps
            c["psnr"].append(recorder.psnr)
            print(
                f"[gias-vs-ig] image {i + 1}/{len(indices)} ({index}) {method}: "
                f"PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}, {row['seconds']:.0f} s",
                flush=True,
            )
        run.write_json("curves.json", curves)

    table = [
        aggregate(
            m, [r for r in rows if r["method"] == m], [r for r in rows if r["method"] == "ig"]
        )
        for m in attacks
    ]
    switch = round(int(cfg["attack"]["iterations"]) * float(cfg["attack"]["latent-share"]))
    save_curves(run, curves, switch)
    grid_rows = [("original", victims)] + [(m, torch.cat(recon[m])) for m in attacks]
    save_rows_grid(run.path / "grids" / "comparison.png", grid_rows, scale=max(1, 96 // side))
    wall = time.perf_counter() - started
    results = {
        "title": f"GIAS vs Inverting Gradients at equal iterations ({cfg['data']['dataset']})",
        "summary": _summary(cfg, table, notes, wall, len(indices)),
        "rows": rows,
        "table": table,
    }
    write_results(run, results)
    return results
