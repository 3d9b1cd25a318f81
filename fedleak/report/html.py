"""report.html: the one self-contained page a person reads first (inline CSS, images as data URIs).

It must render whatever a run left behind, including a killed run with torn logs and no images,
so every section degrades to a sentence saying what is missing instead of raising.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import json
import os
import re
from html import escape
from pathlib import Path
from typing import Any

from fedleak.runfolder import (
    ATTACK,
    CONFIG,
    INVERSION,
    META,
    METRICS,
    REPORT,
    RunFolder,
    atomic_write_text,
    now_iso,
)

from .inversion import inversion_grids, inversion_table, inversion_verdict
from .plots import by_variant, number, plot_metrics, realism_threshold

VARIANT_LABELS = {
    "active": "Active GAN attack",
    "passive": "Passive GAN attack",
    "model-inversion": "Model-inversion baseline",
}
SCORE_COLUMNS = (
    ("target_rate", "target rate", 2),
    ("target_confidence", "target confidence", 2),
    ("nn_l2_median", "median NN L2", 1),
    ("nn_ssim_target", "NN SSIM target", 3),
    ("nn_ssim_other", "NN SSIM other", 3),
    ("diversity", "diversity", 3),
)
PLOT_CAPTIONS = {
    "accuracy": "Shared model per round: test accuracy and the victim-side cost",
    "attack": "Attack scores per round (stars: rounds the scorer called a success)",
}
_PNG = b"\x89PNG\r\n\x1a\n"

CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em;
border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}
.banner{padding:.6em 1em;border-radius:4px;margin:1em 0;font-weight:600}
.banner.failed,.banner.interrupted{background:#fde2e1;border:1px solid #d33;color:#900}
.banner.running,.banner.unknown{background:#fff4d6;border:1px solid #e0a800;color:#7a5a00}
.verdict{font-size:1.1em;padding:.7em 1em;border-left:6px solid #999;background:#f5f5f5}
.verdict.success{border-color:#1a7f37;background:#e9f7ee}
.verdict.fail{border-color:#c62828;background:#fbeeee}
.note{color:#7a5a00}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
td.ok{color:#1a7f37;font-weight:600}
img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
footer{margin-top:3em;color:#888;font-size:.85em}
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    v = number(value)
    if v is None:
        return "—"
    return str(int(v)) if isinstance(value, int) else f"{v:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "—"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def _round_label(rec: dict) -> str:
    return _fmt(rec.get("round"))


def _target(rec: dict, config: dict) -> str:
    target = rec.get("target")
    if target is None and isinstance(config.get("eval"), dict):
        target = config["eval"].get("target-class")
    return f"class {target}" if target is not None else "the target class"


def _best(recs: list[dict]) -> dict:
    """The first success, else the highest target rate (ties: the smallest NN distance)."""
    for rec in recs:
        if rec.get("success") is True:
            return rec

    def key(rec: dict) -> tuple[float, float]:
        rate, l2 = number(rec.get("target_rate")), number(rec.get("nn_l2_median"))
        return (-1.0 if rate is None else rate, -(float("inf") if l2 is None else l2))

    return max(recs, key=key)


def _variant_sentence(variant: str, recs: list[dict], config: dict, threshold: float) -> str:
    label = VARIANT_LABELS.get(variant, f"{variant} attack")
    best = _best(recs)
    head = f"{label} on {_target(best, config)}"
    rate, l2 = number(best.get("target_rate")), number(best.get("nn_l2_median"))
    dist = ""
    if l2 is not None:
        dist = f"median NN distance {l2:.1f} {'<=' if l2 <= threshold else '>'} {threshold:g}"
    # Only the scorer's success flag counts: a generator can fool the evaluator with noise.
    if best.get("success") is True:
        parts = [p for p in (f"target rate {_fmt(rate, 2)}", dist) if p]
        return f"{head}: success at round {_round_label(best)} ({', '.join(parts)})."
    text = f"{head}: no success in {len(recs)} scored sample set{'s' if len(recs) != 1 else ''}"
    if rate is not None:
        text += f"; best target rate {rate:.2f} at round {_round_label(best)}"
        if dist:
            text += f" with {dist}"
        if rate >= 0.5:
            text += " (a high evaluator target rate alone is not a success)"
    return text + "."


def verdict(
    meta: dict, metrics: list[dict], attack: list[dict], config: dict, threshold: float
) -> tuple[str, str]:
    """(css class, headline sentence) computed from the recorded data only."""
    if not metrics and not attack:
        kind, text = "none", "No rounds were recorded."
    elif not attack:
        n = len(metrics)
        kind = "none"
        text = f"No attack scores were recorded ({n} training round{'s' if n != 1 else ''})."
    else:
        groups = by_variant(attack)
        kind = "success" if any(r.get("success") is True for r in attack) else "fail"
        text = " ".join(_variant_sentence(v, recs, config, threshold) for v, recs in groups.items())
    return kind, text + partial_note(meta)


def partial_note(meta: dict) -> str:
    """What the run's status means for its results ('' when it finished)."""
    status = meta.get("status")
    if status in ("failed", "interrupted", "stopped"):
        return f" Results are partial: the run {status}."
    if status != "finished":
        return " The run did not record that it finished, so results may be partial."
    return ""


def _img(path: Path, alt: str) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    if not data.startswith(_PNG):  # a torn or foreign file would show as a broken image
        return ""
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{b64}">'


def _latest(directory: Path, prefix: str = "") -> dict[str, tuple[int, Path]]:
    """Newest ``<prefix><series>round-XXXX.png`` per series (e.g. ``active-a1-``).

    The contract names are ``samples/round-XXXX.png`` and ``grids/figure6-round-XXXX.png``, but
    writers may tag files per variant and attacker, so every series gets its latest image.
    """
    pattern = re.compile(re.escape(prefix) + r"(.*?)round-(\d+)\.png")
    latest: dict[str, tuple[int, Path]] = {}
    for p in directory.glob(f"{prefix}*round-*.png"):
        m = pattern.fullmatch(p.name)
        try:
            if not m or not p.stat().st_size:  # empty: killed before the image landed
                continue
        except OSError:
            continue
        series_, rnd = m.group(1).strip("-"), int(m.group(2))
        if series_ not in latest or rnd > latest[series_][0]:
            latest[series_] = (rnd, p)
    return dict(sorted(latest.items()))


def _figure(path: Path, caption: str) -> str:
    tag = _img(path, caption)
    if not tag:
        return f'<p class="note">{escape(caption)}: the image file is unreadable.</p>'
    return f"<figure>{tag}<figcaption>{escape(caption)}</figcaption></figure>"


def _table(header: list[str], rows: list[list[str]], left: int = 1, cls: str = "") -> str:
    """Cells are already-escaped HTML; the first ``left`` columns are left-aligned."""

    def cells(tag: str, row: list[str]) -> str:
        return "".join(
            f"<{tag}{' class=l' if i < left else ''}>{c}</{tag}>" for i, c in enumerate(row)
        )

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f'<table class="{escape(cls)}"><tr>{cells("th", header)}</tr>{body}</table>'


def _score_row(variant: str, what: str, rec: dict, threshold: float) -> list[str]:
    row = [escape(variant), escape(what), _round_label(rec), escape(str(rec.get("target", "—")))]
    for key, _, digits in SCORE_COLUMNS:
        cell = escape(_fmt(rec.get(key), digits))
        l2 = number(rec.get(key))
        if key == "nn_l2_median" and l2 is not None and l2 <= threshold:
            cell = f'<span title="within the realism threshold">{cell}</span>'
        row.append(cell)
    row.append(escape(_fmt(rec.get("success"))) if "success" in rec else "—")
    return row


def _attack_section(attack: list[dict], threshold: float) -> str:
    if not attack:
        return "<p>No attack scores were recorded (attack.jsonl is missing or empty).</p>"
    rows = []
    for variant, recs in by_variant(attack).items():
        final, best = recs[-1], _best(recs)
        what = "first success" if best.get("success") is True else "best target rate"
        if best is final:
            rows.append(_score_row(variant, f"final = {what}", final, threshold))
        else:
            rows.append(_score_row(variant, what, best, threshold))
            rows.append(_score_row(variant, "final", final, threshold))
    header = ["variant", "which", "round", "target"] + [c[1] for c in SCORE_COLUMNS] + ["success"]
    note = (
        f"<p>Success is the scorer's verdict (attack.jsonl <code>success</code>), not the "
        f"evaluator's target rate; realism threshold for the median NN L2 distance: "
        f"{threshold:g}.</p>"
    )
    return _table(header, rows, left=2, cls="attack-scores") + note


def _model_section(metrics: list[dict]) -> str:
    if not metrics:
        return "<p>No rounds were recorded (metrics.jsonl is missing or empty).</p>"
    last = metrics[-1]

    def at(key: str, best: bool = False) -> str:
        recs = [r for r in metrics if number(r.get(key)) is not None]
        if not recs:
            return "—"
        rec = max(recs, key=lambda r: number(r.get(key))) if best else recs[-1]
        return f"{_fmt(rec.get(key))} (round {_round_label(rec)})"

    rows = [
        ["rounds recorded", f"{len(metrics)} (last: round {_round_label(last)})"],
        ["final test accuracy", at("test_accuracy")],
        ["best test accuracy", at("test_accuracy", best=True)],
        ["victim cost: target test images → fake class, final", at("test_to_fake")],
        ["victim cost: target test images → fake class, max", at("test_to_fake", best=True)],
        ["final train loss", at("train_loss")],
        ["participants in last round", _fmt(last.get("participants"))],
        ["elapsed at last round", _duration(number(last.get("time")))],
    ]
    return _table(["", "value"], [[escape(a), escape(b)] for a, b in rows], cls="model")


def _images_section(run: RunFolder, attack: list[dict]) -> str:
    parts = []
    for name, caption in PLOT_CAPTIONS.items():
        p = run.path / "plots" / f"{name}.png"
        if p.is_file():
            parts.append(_figure(p, caption))
    if not parts:
        parts.append("<p>No plots (nothing to plot yet).</p>")
    samples = _latest(run.path / "samples")
    for name, (rnd, p) in samples.items():
        tag = f"{name}, " if name else ""
        parts.append(_figure(p, f"Generated samples, {tag}round {rnd} (latest)"))
    if not samples:
        parts.append("<p>No sample grid was written.</p>")
    shown = set()
    for name, (rnd, p) in _latest(run.path / "grids", "figure6-").items():
        tag = f"{name}, " if name else ""
        caption = f"Figure 6 layout, {tag}round {rnd} (latest): nearest victim image above each"
        parts.append(_figure(p, caption + " generated sample"))
        shown.add(p)
    for variant, recs in by_variant(attack).items():
        first = next((r for r in recs if r.get("success") is True), None)
        rnd = number(first.get("round")) if first else None
        if rnd is None:
            continue
        tagged = f"figure6-{variant}-a{first.get('attacker')}-round-{int(rnd):04d}.png"
        for p in (run.path / "grids" / tagged, run.figure6_path(int(rnd))):
            if p.is_file() and p not in shown:
                caption = f"Figure 6 layout, {variant}, round {int(rnd)} (first success)"
                parts.append(_figure(p, caption))
                shown.add(p)
                break
    return "".join(parts)


def _details_section(run: RunFolder, meta: dict, config: Any) -> str:
    started, finished = meta.get("started"), meta.get("finished")
    took = None
    # Missing, malformed or naive-vs-aware times: show no duration rather than fail.
    with contextlib.suppress(TypeError, ValueError):
        took = (
            _dt.datetime.fromisoformat(finished) - _dt.datetime.fromisoformat(started)
        ).total_seconds()
    rows = [
        ["run folder", str(run.path.resolve())],
        ["preset", str(meta.get("preset", "—"))],
        ["seed", str(meta.get("seed", "—"))],
        ["status", str(meta.get("status", "unknown"))],
        ["started", str(started or "—")],
        ["finished", str(finished or "—")],
        ["duration", _duration(took)],
        ["message", str(meta.get("message") or "—")],
    ]
    out = _table(["", ""], [[escape(a), escape(b)] for a, b in rows], cls="meta")
    versions = meta.get("versions")
    if isinstance(versions, dict) and versions:
        vrows = [
            [escape(str(k)), escape(str(v if v is not None else "not installed"))]
            for k, v in sorted(versions.items())
        ]
        out += "<h3>Versions</h3>" + _table(["package", "version"], vrows, left=2, cls="versions")
    else:
        out += "<p>Versions were not recorded.</p>"
    logs = sorted(p.name for p in (run.path / "logs").glob("*.log"))
    if logs:
        out += f"<p>Logs in the run folder: {escape(', '.join('logs/' + n for n in logs))}</p>"
    cfg = json.dumps(config, indent=2, sort_keys=True, default=str) if config else "not recorded"
    out += f"<details><summary>Resolved config</summary><pre>{escape(cfg)}</pre></details>"
    return out


def render(run: RunFolder, notes: list[str] | None = None) -> str:
    """The report page as a string (nothing written)."""
    meta = run.read_json(META, {})
    meta = meta if isinstance(meta, dict) else {}
    config = run.read_json(CONFIG, {})
    config = config if isinstance(config, dict) else {}
    metrics, bad_m = run.read_jsonl_checked(METRICS)
    attack, bad_a = run.read_jsonl_checked(ATTACK)
    inversion, _ = run.read_jsonl_checked(INVERSION)
    threshold = realism_threshold(config)
    notes = list(notes or [])
    for name, bad in ((METRICS, bad_m), (ATTACK, bad_a)):
        if bad:
            notes.append(
                f"{bad} unreadable line{'s' if bad != 1 else ''} in {name} skipped "
                "(a run killed mid-write leaves a torn last line)."
            )
    if not (run.path / META).is_file():
        notes.append("meta.json is missing.")

    status = str(meta.get("status") or "unknown")
    preset = str(meta.get("preset") or "—")
    kind, headline = verdict(meta, metrics, attack, config, threshold)
    inversion_html = ""
    if inversion:
        inv_kind, inv_text = inversion_verdict(inversion)
        if not attack:
            kind, headline = inv_kind, inv_text + partial_note(meta)
        else:
            headline += " " + inv_text
        figures = "".join(_figure(p, c) for p, c in inversion_grids(run.path))
        inversion_html = "<h2>Gradient inversion</h2>" + inversion_table(inversion) + figures
    banner = ""
    if status != "finished":
        msg = meta.get("message")
        text = {
            "failed": "RUN FAILED",
            "interrupted": "RUN INTERRUPTED",
            "stopped": "RUN STOPPED at its time budget",
            "running": "RUN NOT FINISHED: status is still 'running' (in progress, or killed)",
        }.get(status, f"RUN STATUS UNKNOWN ({status})")
        if msg:
            text += f": {msg}"
        cls = status if status in ("failed", "interrupted", "running") else "unknown"
        cls = "interrupted" if status == "stopped" else cls
        banner = f'<div class="banner {cls}">{escape(text)}</div>'
    title = f"fedleak run {run.path.name} — preset {preset} — {status}"
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{escape(run.path.name)}</h1>",
            f'<p class="sub">preset <b>{escape(preset)}</b> · status <b>{escape(status)}</b> · '
            f"seed {escape(str(meta.get('seed', '—')))}</p>",
            banner,
            f'<p class="verdict {kind}" id="verdict">{escape(headline)}</p>',
            "".join(f'<p class="note">{escape(n)}</p>' for n in notes),
            inversion_html,
            "" if inversion and not attack else "<h2>Attack scores</h2>",
            "" if inversion and not attack else _attack_section(attack, threshold),
            "<h2>Shared model</h2>",
            _model_section(metrics),
            "<h2>Plots and samples</h2>",
            _images_section(run, attack),
            "<h2>Run details</h2>",
            _details_section(run, meta, config),
            f"<footer>Generated {escape(now_iso())} by fedleak.report from the files in this run "
            "folder.</footer></body></html>\n",
        ]
    )


def write_report(run_dir: str | os.PathLike) -> Path:
    """Regenerate the plots and write ``report.html`` into ``run_dir`` (atomically)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no run folder at {path}")
    run = RunFolder(path)
    notes = []
    try:
        plot_metrics(run)
    except Exception as exc:  # a plotting bug must not cost the person the rest of the report
        notes.append(f"Plots could not be drawn: {type(exc).__name__}: {exc}")
    return atomic_write_text(path / REPORT, render(run, notes))
