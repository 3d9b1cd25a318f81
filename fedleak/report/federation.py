"""The report of a federated run: the verdict first, then each attack with what it means, the
shared model, who took part, and the run's details. Everything is computed from the run folder's
files (metrics.jsonl, attack.jsonl, inversion.jsonl, meta.json, config.json, grids)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedleak.records import GanScore, InversionScore, RoundMetrics
from fedleak.report.page import fmt, number, write_page
from fedleak.report.plots import plot_metrics
from fedleak.runfolder import ATTACK, CONFIG, INVERSION, META, METRICS, RunFolder

# PSNR on [0, 1] images above which a reconstruction is a recognisable copy (the DLG and
# Inverting Gradients papers' examples of successful recovery sit above it).
RECOVERED_DB = 30.0

# The GAN measures the table shows (key, digits); their labels are fedleak.metrics.attack's.
GAN_MEASURES = (
    ("target_rate", 2),
    ("fd", 1),
    ("fd_threshold", 1),
    ("diversity", 2),
    ("nn_l2_median", 1),
    ("nn_ssim_target", 3),
    ("nn_ssim_other", 3),
)
VARIANTS = {"active": "active GAN attack", "passive": "passive GAN attack (no fakes injected)"}


@dataclass
class GanSection:
    title: str
    verdict: str
    success: bool
    explanation: str
    rows: list[list[str]]
    strips: list[tuple[int, Path]]
    figure: tuple[Path, str] | None
    baseline: list[str] | None = None


@dataclass
class InversionSection:
    verdict: list[str]
    success: bool
    explanation: str
    header: list[str]
    rows: list[list[str]]
    figures: list[tuple[Path, str]] = field(default_factory=list)


def _gan_scores(run: RunFolder) -> list[GanScore]:
    return [GanScore.from_dict(r) for r in run.read_jsonl(ATTACK) if "round" in r]


def _best(scores: list[GanScore]) -> GanScore:
    """The first success, else the highest evaluator rate (ties: the smallest NN distance)."""
    for s in scores:
        if s.success:
            return s
    usable = [s for s in scores if s.error is None] or scores

    def key(s: GanScore) -> tuple[float, float]:
        rate, l2 = number(s.get("target_rate")), number(s.get("nn_l2_median"))
        return (-1.0 if rate is None else rate, -(float("inf") if l2 is None else l2))

    return max(usable, key=key)


def _gan_row(which: str, s: GanScore) -> list[str]:
    if s.error:
        return [which, str(s.round), s.error] + ["—"] * (len(GAN_MEASURES) - 1) + ["no"]
    cells = [fmt(s.get(k), d) for k, d in GAN_MEASURES]
    return [which, str(s.round), *cells, s.get("verdict") or ("yes" if s.success else "no")]


def gan_header() -> list[str]:
    from fedleak.metrics.attack import MEASURES

    return ["which", "round"] + [MEASURES.get(k, k) for k, _ in GAN_MEASURES] + ["verdict"]


def _gan_explanation(
    label: str, scores: list[GanScore], threshold: float | None, rounds: int, preset: str
) -> tuple[str, str]:
    """(verdict line, what-it-means paragraph), from the numbers."""
    best = _best(scores)
    target = best.target
    rate, l2 = number(best.get("target_rate")), number(best.get("nn_l2_median"))
    if best.success:
        verdict = (
            f"{label}: the victim's class {target} leaked — success at round {best.round} "
            f"(evaluator rate {fmt(rate, 2)}, median distance to a real image {fmt(l2, 1)})."
        )
        text = (
            f"From round {best.round} on, the attacker's generator draws images that an "
            f"independent classifier assigns to class {target} ({fmt(rate, 2)} of them), whose "
            f"distribution is as close to the victim's real class-{target} images as real held-"
            f"out images are (Fréchet distance {fmt(best.get('fd'), 1)} ≤ "
            f"{fmt(best.get('fd_threshold'), 1)}), and which vary like real images do. The "
            f"attacker never saw a single image of class {target}: it learned them from the "
            "shared model, which the victim trained on its private data."
        )
        if best.get("fd_calibration"):
            text += f" Threshold: {best.get('fd_calibration')}"
        return verdict, text
    verdict = f"{label}: no success in {len(scores)} scored sample set(s)"
    if rate is not None:
        verdict += f"; best evaluator rate {fmt(rate, 2)} at round {best.round}"
    text = (
        f"No sample set passed both tests: enough samples classified as class {target} and realism"
    )
    text += f" (median distance to a real image ≤ {threshold:g})." if threshold else "."
    if rate is not None and rate >= 0.5:
        text += (
            " A high evaluator rate alone is not a leak: noise blobs can fool a classifier, "
            "which is why realism is scored too."
        )
    if rounds < 40:
        text += (
            f" This run had {rounds} rounds; the GAN attack needs about 60 on MNIST "
            "(`fedleak run gan-mnist`)."
        )
    elif preset:
        text += " Try more rounds (--set run.rounds=...) or another seed."
    return verdict + ".", text


def gan_sections(run: RunFolder, config: dict) -> list[GanSection]:
    scores = _gan_scores(run)
    threshold = number((config.get("eval") or {}).get("realism-threshold"))
    threshold = threshold if threshold and threshold > 0 else None
    rounds = int((config.get("run") or {}).get("rounds", 0) or 0)
    preset = str(config.get("preset", ""))
    groups: dict[tuple[int | None, str], list[GanScore]] = defaultdict(list)
    baselines: dict[int | None, GanScore] = {}
    for s in scores:
        if s.variant == "model-inversion":
            baselines[s.attacker] = s
        else:
            groups[(s.attacker, s.variant)].append(s)
    out = []
    for (attacker, variant), recs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        recs.sort(key=lambda s: s.round)
        label = (
            f"Participant {attacker}, {VARIANTS.get(variant, variant)} on class {recs[0].target}"
        )
        verdict, text = _gan_explanation(label, recs, threshold, rounds, preset)
        best, final = _best(recs), recs[-1]
        rows = [_gan_row("first success" if best.success else "best", best)]
        if final is not best:
            rows.append(_gan_row("final", final))
        strips = []
        for s in recs:
            tag = f"{variant}-a{attacker}-round-{s.round:04d}"
            path = run.path / "samples" / f"strip-{tag}.png"
            if path.exists():
                strips.append((s.round, path))
        shown = best if best.success else final
        fig = run.path / "grids" / f"figure6-{variant}-a{attacker}-round-{shown.round:04d}.png"
        caption = (
            f"Round {shown.round}: each generated sample (bottom) under the real class-"
            f"{shown.target} image nearest to it (top) — Hitaj et al.'s Figure 6"
        )
        baseline = baselines.get(attacker)
        out.append(
            GanSection(
                title=label,
                verdict=verdict,
                success=best.success,
                explanation=text,
                rows=rows,
                strips=strips,
                figure=(fig, caption) if fig.exists() else None,
                baseline=_gan_row("model inversion of the final model", baseline)
                if baseline
                else None,
            )
        )
    return out


# --- gradient inversion -----------------------------------------------------------------------

THREATS = {
    "adversarial client": "a participant that follows the protocol and isolates the victim's "
    "update from consecutive global models",
    "curious server": "the server, which sees every individual update before aggregating",
}


def _against(s: InversionScore) -> str:
    if s.participant is not None:
        return f"participant {s.participant}"
    return "the others' aggregate" if s.threat == "client" else "—"


def inversion_section(run: RunFolder) -> InversionSection | None:
    scores = [InversionScore.from_dict(r) for r in run.read_jsonl(INVERSION) if "round" in r]
    if not scores:
        return None
    scored = [s for s in scores if s.psnr is not None]
    lines, explain = [], []
    for threat, label in (("client", "Adversarial client"), ("server", "Curious server")):
        mine = [s for s in scored if s.threat == threat]
        failed = [s for s in scores if s.threat == threat and s.psnr is None]
        if not mine and not failed:
            continue
        if not mine:
            lines.append(f"{label}: no reconstruction could be scored ({failed[0].error}).")
            continue
        ok = [s for s in mine if s.psnr >= RECOVERED_DB]
        best = max(mine, key=lambda s: s.psnr)
        images = sum(s.batch_size for s in ok)
        total = sum(s.batch_size for s in mine)
        labels = sum(round((s.label_accuracy or 0) * s.batch_size) for s in ok)
        if ok:
            lines.append(
                f"{label}: reconstructed {images}/{total} private image{'s' * (total > 1)} at "
                f"≥ {RECOVERED_DB:g} dB (best PSNR {best.psnr:.1f} dB, SSIM {best.ssim:.3f}), "
                f"labels {labels}/{images}."
            )
        else:
            lines.append(
                f"{label}: no private image recovered: the best of {total} reached "
                f"{best.psnr:.1f} dB (< {RECOVERED_DB:g} dB, SSIM {best.ssim:.3f}). Larger "
                "batches and more local steps make inversion harder; more restarts "
                "(attack.inversion-restarts) or another attack (attack.inversion) may still "
                "succeed."
            )
        if threat == "client":
            explain.append(
                f"The adversarial client took part like anyone else. From two consecutive global "
                f"models it isolated the other clients' update ({best.isolated or 'exact'}) of "
                f"round {best.round} and searched for the image(s) whose gradient matches it "
                f"({best.attack}, {best.iterations} iterations, {best.seconds:.0f} s)."
            )
        else:
            explain.append(
                f"The curious server runs the protocol honestly but inverts every individual "
                f"update it receives before aggregating: best {best.psnr:.1f} dB against "
                f"{_against(best)}'s private batch."
            )
    if scored:
        explain.append(
            f"PSNR is measured on [0, 1] images after matching each reconstruction to a private "
            f"image; above {RECOVERED_DB:g} dB a reconstruction is a near-copy. For scoring, the "
            "experimenter recomputes the victims' private batches from the seed; no attacker "
            "was given them."
        )
    header, rows = _inversion_table(scores)
    who = {s.node: s.participant for s in scores if s.node is not None}
    figures = []
    for path in sorted((run.path / "grids").glob("inversion-*.png")):
        m = re.fullmatch(r"inversion-(client|server)-round-(\d+)(?:-node-(\d+))?", path.stem)
        if not m:
            continue
        if m[1] == "client":
            label = "adversarial client"
        else:
            victim = who.get(int(m[3])) if m[3] else None
            against = f"node {m[3]}" if victim is None else f"participant {victim}"
            label = f"curious server vs {against}"
        figures.append((path, f"Round {int(m[2])}, {label}"))
    success = any(s.psnr >= RECOVERED_DB for s in scored)
    return InversionSection(
        lines or ["No reconstruction was recorded."],
        success,
        " ".join(explain),
        header,
        rows,
        figures,
    )


ATTACKERS = {"client": "adversarial client", "server": "curious server"}

# (column, cell) of the inversion table; a column empty in every row is left out
INVERSION_COLUMNS: list[tuple[str, Callable[[InversionScore], str]]] = [
    ("round", lambda s: str(s.round)),
    ("attacker", lambda s: ATTACKERS.get(s.threat, s.threat)),
    ("victim", _against),
    ("attack", lambda s: f"{s.attack or '—'}, {s.update or '—'} ×{s.local_steps}"),
    ("batch", lambda s: str(s.batch_size or "—")),
    ("PSNR dB", lambda s: fmt(s.psnr, 1) if s.error is None else s.error[:120]),
    ("SSIM", lambda s: fmt(s.ssim, 3)),
    ("labels", lambda s: fmt(s.label_accuracy, 2)),
    ("iters", lambda s: fmt(s.iterations)),
    ("grad evals", lambda s: fmt(s.evaluations)),
    ("restarts", lambda s: _restarts(s)),
    ("final losses (* kept)", lambda s: _restart_losses(s)),
    ("stopped", lambda s: s.stopped or "—"),
    ("time s", lambda s: fmt(s.seconds, 0)),
]


def _restarts(s: InversionScore) -> str:
    if not s.per_restart_loss:
        return fmt(s.restart)
    return f"{len(s.per_restart_loss)}, kept #{s.restart}"


def _restart_losses(s: InversionScore) -> str:
    # one significant digit: the spread across restarts is orders of magnitude, not digits
    return (
        " ".join(
            f"{v:.0e}" + ("*" if i == s.restart else "") for i, v in enumerate(s.per_restart_loss)
        )
        or "—"
    )


def _inversion_table(scores: list[InversionScore]) -> tuple[list[str], list[list[str]]]:
    cells = [[cell(s) for _, cell in INVERSION_COLUMNS] for s in scores]
    keep = [i for i in range(len(INVERSION_COLUMNS)) if any(r[i] != "—" for r in cells)]
    return [INVERSION_COLUMNS[i][0] for i in keep], [[r[i] for i in keep] for r in cells]


# --- the shared model -------------------------------------------------------------------------


def model_rows(metrics: list[RoundMetrics]) -> list[tuple[str, str]]:
    if not metrics:
        return []
    evaluated = [m for m in metrics if m.test_accuracy is not None]
    rows = []
    initial = next((m for m in evaluated if m.round == 0), None)
    if initial:
        rows.append(("test accuracy of the initial model (round 0)", fmt(initial.test_accuracy)))
    if evaluated:
        last = evaluated[-1]
        best = max(evaluated, key=lambda m: m.test_accuracy)
        rows.append(("final test accuracy", f"{fmt(last.test_accuracy)} (round {last.round})"))
        rows.append(("best test accuracy", f"{fmt(best.test_accuracy)} (round {best.round})"))
    victim = [m for m in evaluated if m.victims]
    if victim:
        worst = max(victim, key=lambda m: m.victims[0]["to_fake"])
        v = victim[-1].victims[0]
        rows.append(
            (
                f"victim cost: class-{v['target']} test images sent to the fake class {v['fake']}",
                f"final {fmt(v['to_fake'], 2)}, worst {fmt(worst.victims[0]['to_fake'], 2)} "
                f"(round {worst.round})",
            )
        )
    trained = [m for m in metrics if m.round > 0]
    rows.append(("training rounds recorded", str(len(trained))))
    rejected = sum(m.rejected for m in trained)
    if rejected:
        rows.append(("replies rejected by the server", str(rejected)))
    empty = [m.round for m in trained if m.participants == 0]
    if empty:
        rows.append(("rounds without a usable reply", ", ".join(map(str, empty[:20]))))
    return rows


def protocol_note(config: dict) -> str:
    run = config.get("run") or {}
    protocol = run.get("protocol")
    if protocol == "collaborative":
        return (
            "Collaborative protocol (Shokri & Shmatikov): participants take turns, one per round, "
            "so the shared model alternates between what each participant taught it. The "
            "accuracy curve is a sawtooth for that reason, not because training is unstable. "
            "Round 0 is the initial, untrained model."
        )
    if protocol == "fedsgd":
        return (
            "FedSGD: every round each participant takes one gradient step on one private batch "
            "and the server averages the updates. Round 0 is the initial model."
        )
    return (
        "FedAvg: every round each participant trains locally and the server averages the models, "
        "weighted by the declared example counts. Round 0 is the initial model."
    )


def verdict_lines(run: RunFolder) -> list[tuple[bool, str]]:
    """(succeeded, one line) per attack: what the terminal prints at the end, and the report's
    verdict box."""
    config = run.read_json(CONFIG, {})
    config = config if isinstance(config, dict) else {}
    lines = [(g.success, g.verdict) for g in gan_sections(run, config)]
    for g in gan_sections(run, config):
        if not g.success:
            lines.append((False, f"  why: {g.explanation}"))
    inversion = inversion_section(run)
    if inversion:
        lines += [(inversion.success, line) for line in inversion.verdict]
    return lines


def write_federation_report(run: RunFolder) -> Path:
    notes: list[str] = []
    try:
        plot_metrics(run)
    except Exception as exc:  # a plotting bug must not cost the person the rest of the report
        notes.append(f"Plots could not be drawn: {type(exc).__name__}: {exc}")
    config = run.read_json(CONFIG, {})
    config = config if isinstance(config, dict) else {}
    meta = run.read_json(META, {})
    meta = meta if isinstance(meta, dict) else {}
    metrics = [RoundMetrics.from_dict(r) for r in run.read_jsonl(METRICS) if "round" in r]
    for name in (METRICS, ATTACK, INVERSION):
        torn = run.read_jsonl_checked(name)[1]
        if torn:
            notes.append(f"{torn} unreadable line(s) in {name} skipped (a killed run's torn line).")
    notes += [str(n) for n in meta.get("notes", [])]
    gans = gan_sections(run, config)
    inversion = inversion_section(run)
    verdicts: list[tuple[str, list[str]]] = []
    for g in gans:
        verdicts.append(("success" if g.success else "fail", [g.verdict]))
    if inversion:
        verdicts.append(("success" if inversion.success else "fail", inversion.verdict))
    if not verdicts:
        verdicts.append(("none", ["No attack result was recorded."]))
    plots = [
        (
            run.path / "plots" / "accuracy.png",
            "Shared model per round: test accuracy"
            + (" and the victim-side cost (GAN attack)" if any(m.victims for m in metrics) else ""),
        ),
        (run.path / "plots" / "attack.png", "GAN attack scores per round (stars: successes)"),
    ]
    return write_page(
        run,
        "federation.html",
        verdicts=verdicts,
        notes=notes,
        gans=gans,
        gan_header=gan_header() if gans else [],
        inversion=inversion,
        threats=THREATS,
        model_rows=model_rows(metrics),
        protocol_note=protocol_note(config),
        plots=[(p, c) for p, c in plots if p.exists()],
        participation=[
            [
                r.get("who"),
                fmt(r.get("node")),
                fmt(r.get("replied")),
                fmt(r.get("aggregated")),
                fmt(r.get("rejected")),
                fmt(r.get("last_round")),
            ]
            for r in meta.get("participation", [])
        ],
        devices=sorted(
            {(r["who"], r["device"]) for r in meta.get("participation", []) if r.get("device")}
        ),
        preset=str(meta.get("preset") or "—"),
        seed=meta.get("seed", "—"),
    )
