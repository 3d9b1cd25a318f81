"""The report of an Ensembler run: our Table 1 next to the paper's, the acceptance check, the
reconstruction grids, the time spent, and the run's details.

The paper's numbers are a labelled reference column, typed in from Liu et al. (2024), Table 1
(CIFAR-10, N=10, P=4, full CIFAR-10, GPU training); they are never presented as our results.
"""

from __future__ import annotations

from pathlib import Path

from fedleak.report.page import duration, fmt, number, signed, write_page
from fedleak.runfolder import RunFolder

WEAK_ATTACK_SSIM = 0.3  # below this against NONE, reconstructions are not recognisable
# name -> (change in accuracy %, SSIM, PSNR) exactly as printed in the paper's Table 1.
PAPER_TABLE1: dict[str, tuple[float, float, float]] = {
    "NONE": (0.00, 0.4363, 12.2678),
    "Shredder": (-5.68, 0.5359, 10.4033),
    "Single": (2.15, 0.3921, 7.5266),
    "DR-single": (2.70, 0.3453, 6.6674),
    "DR-ensemble (best SSIM)": (1.42, 0.373, 7.3493),
    "DR-ensemble (best PSNR)": (1.42, 0.3232, 7.9598),
    "Adaptive": (-2.13, 0.0555, 5.981),
    "N=1 (best SSIM)": (-2.13, 0.2889, 4.865),
    "N=1 (best PSNR)": (-2.13, 0.2221, 5.5348),
}
HEADER = [
    "Defense / attack",
    "accuracy",
    "change vs NONE (points)",
    "SSIM",
    "PSNR (dB)",
    "attack variant",
    "paper: change in accuracy (%)",
    "paper: SSIM",
    "paper: PSNR",
]


def _spread(row: dict, metric: str, digits: int) -> str:
    """``mean ± std`` over the attacker trials when there were several, else the number."""
    value, std = fmt(row.get(metric), digits), number(row.get(f"{metric}_std"))
    if len(row.get("trials", [])) > 1 and std is not None:
        return f"{value} ± {std:.{digits}f}"
    return value


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        paper = PAPER_TABLE1.get(str(r.get("name", "")))
        ref = [signed(paper[0]), fmt(paper[1], 4), fmt(paper[2], 4)] if paper else ["—"] * 3
        out.append(
            [
                str(r.get("name")),
                fmt(r.get("accuracy"), 4),
                signed(r.get("accuracy_change")),
                _spread(r, "ssim", 4),
                _spread(r, "psnr", 2),
                str(r.get("variant")),
                *ref,
            ]
        )
    return out


def acceptance_lines(acc: dict, rows: list[dict]) -> tuple[str, list[str]]:
    if not acc or not acc.get("evaluated"):
        return "none", ["No Ensembler rows: the acceptance check was not evaluated."]
    ok = bool(acc.get("ssim_met_strongest_attack") and acc.get("accuracy_met"))
    lines = [
        f"SSIM vs Ensembler / SSIM vs NONE, strongest attack: "
        f"{fmt(acc.get('ssim_ratio_strongest_attack'))} "
        f"({'meets' if acc.get('ssim_met_strongest_attack') else 'misses'} the bar of 0.5; the "
        f"adaptive attack {'meets' if acc.get('ssim_met_adaptive') else 'misses'} it). Accuracy "
        f"gap to NONE: {fmt(acc.get('accuracy_gap_points'), 2)} points "
        f"({'within' if acc.get('accuracy_met') else 'outside'} 3).",
        "SSIM ratio per Ensembler row: "
        + ", ".join(f"{k}: {fmt(v)}" for k, v in acc.get("ssim_ratio_per_row", {}).items())
        + ".",
    ]
    none = next((r for r in rows if r.get("defense") == "none"), {})
    weak = weak_attack_note(none)
    return ("success" if ok else "fail"), lines + ([weak] if weak else [])


def weak_attack_note(none: dict) -> str:
    """A ratio only shows protection if the attack works on the undefended split."""
    none_ssim = number(none.get("ssim"))
    if none_ssim is None or none_ssim >= WEAK_ATTACK_SSIM:
        return ""
    trials = [t.get("ssim") for t in none.get("trials", [])]
    if len(trials) > 1:
        good = sum((number(v) or -1) >= WEAK_ATTACK_SSIM for v in trials)
        return (
            f"Against NONE the attack averages SSIM {none_ssim:.3f}, below {WEAK_ATTACK_SSIM}; "
            f"{good} of its {len(trials)} trials reach {WEAK_ATTACK_SSIM} "
            f"({', '.join(fmt(v) for v in trials)}). It does not reliably reconstruct even the "
            "undefended split, so these ratios are weak evidence either way."
        )
    return (
        f"The attack reaches only SSIM {none_ssim:.3f} against NONE, below {WEAK_ATTACK_SSIM}: "
        "it barely reconstructs even the undefended split, so these ratios compare failed "
        "reconstructions and are weak evidence either way."
    )


def write_ensembler_report(run: RunFolder) -> Path:
    results = run.read_json("results.json", {}) or {}
    config = run.read_json("config.json", {}) or {}
    rows = results.get("rows") or []
    kind, lines = acceptance_lines(results.get("acceptance", {}), rows)
    sizes, ens, attack = (
        results.get("sizes", {}),
        config.get("ensembler", {}),
        config.get("attack", {}),
    )
    return write_page(
        run,
        "ensembler.html",
        preset=str(run.read_json("meta.json", {}).get("preset", "")),
        has_rows=bool(rows),
        verdict_kind=kind,
        verdict_lines=lines,
        header=HEADER,
        rows=table_rows(rows),
        sizes=sizes,
        nets=ens.get("num-nets", "?"),
        selected=ens.get("selected", "?"),
        trials=attack.get("trials", 1),
        restarts=attack.get("restarts", 1),
        figures=[(run.path / f["path"], f["name"]) for f in results.get("figures", [])],
        timings=[(k, duration(v)) for k, v in results.get("timings", {}).items()],
    )
