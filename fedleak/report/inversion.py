"""The gradient-inversion part of report.html: what each threat model reconstructed, how well,
and the private images beside the reconstructions."""

from __future__ import annotations

from html import escape
from pathlib import Path

# PSNR on [0, 1] images above which a reconstruction is a recognisable copy (the DLG and
# Inverting Gradients papers' examples of successful recovery sit above it).
RECOVERED_DB = 30.0

THREATS = {
    "client": "adversarial client (victim update isolated from consecutive global models)",
    "server": "curious server (individual update)",
}


def _f(value: object, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "—"


def _against(record: dict) -> str:
    if record.get("threat") == "client":
        return "every other participant"
    if record.get("participant") is None:
        return "—"
    return f"participant {record['participant']} (best match)"


def inversion_verdict(records: list[dict]) -> tuple[str, str]:
    scored = [r for r in records if "psnr" in r]
    if not scored:
        failed = len(records)
        return "fail", f"Gradient inversion: no reconstruction was scored ({failed} failed)."
    parts = []
    for threat, label in (("client", "adversarial client"), ("server", "curious server")):
        mine = [r for r in scored if r["threat"] == threat]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["psnr"])
        ok = sum(r["psnr"] >= RECOVERED_DB for r in mine)
        parts.append(
            f"The {label} recovered {ok} of {len(mine)} observed updates at PSNR >= "
            f"{RECOVERED_DB:g} dB (best {best['psnr']:.1f} dB, SSIM {best['ssim']:.3f}, "
            f"labels {best['label_accuracy']:.0%}, round {best['round']})."
        )
    kind = "success" if any(r["psnr"] >= RECOVERED_DB for r in scored) else "fail"
    return kind, " ".join(parts)


def inversion_table(records: list[dict]) -> str:
    header = [
        "threat",
        "round",
        "node",
        "scored against",
        "attack",
        "update",
        "images",
        "isolated",
        "PSNR dB",
        "SSIM",
        "MSE",
        "labels",
        "seconds",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                escape(r.get("threat", "—")),
                str(r.get("round", "—")),
                escape(str(r.get("node", "—"))),
                escape(_against(r)),
                escape(str(r.get("attack", "—"))),
                escape(f"{r.get('update', '—')} x{r.get('local_steps', 1)}"),
                str(r.get("batch_size", "—")),
                escape(
                    str(r.get("isolated", "individual" if r.get("threat") == "server" else "—"))
                ),
                _f(r.get("psnr"), 1) if "error" not in r else escape(r["error"])[:80],
                _f(r.get("ssim"), 3),
                _f(r.get("mse"), 5),
                _f(r.get("label_accuracy"), 2),
                _f(r.get("seconds"), 0),
            ]
        )
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    legend = "".join(f"<li><b>{k}</b>: {escape(v)}</li>" for k, v in THREATS.items())
    return (
        f'<table class="inversion"><tr>{head}</tr>{body}</table><ul>{legend}</ul>'
        "<p>PSNR and SSIM on [0, 1] images after Hungarian matching of the batch; labels: "
        "fraction of the private labels recovered. The private images are recomputed by the "
        "testbed from the run config; no role ever saw them.</p>"
    )


def inversion_grids(run_path: Path) -> list[tuple[Path, str]]:
    out = []
    for path in sorted((run_path / "grids").glob("inversion-*.png")):
        out.append((path, f"{path.stem}: private images (top) and reconstructions (bottom)"))
    return out
