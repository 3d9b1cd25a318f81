"""report.html of a study folder: summary, aggregate table, per-item rows, every PNG, config.

Like the federated report it must render whatever a failed or killed study left behind, so
each part degrades to a sentence instead of raising. Images are inlined as data URIs.
"""

from __future__ import annotations

import io
import json
import math
import os
from html import escape
from pathlib import Path
from typing import Any

from fedleak.report.html import CSS, _img
from fedleak.runfolder import REPORT, RunFolder, atomic_write_bytes, atomic_write_text, now_iso

RESULTS = "results.json"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _table(rows: list[dict], cls: str) -> str:
    """One HTML table; columns are the union of the rows' keys in first-seen order."""
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return "<p>No rows were recorded.</p>"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=l' if isinstance(r.get(c), str) else ''}>{escape(_cell(r.get(c)))}</td>"
            for c in columns
        )
        + "</tr>"
        for r in rows
    )
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _figures(folder: Path) -> str:
    pngs = sorted(p for p in folder.rglob("*.png") if p.is_file())
    if not pngs:
        return "<p>No images were written.</p>"
    parts = []
    for p in pngs:
        name = p.relative_to(folder).as_posix()
        tag = _img(p, name)
        if tag:
            parts.append(f"<figure>{tag}<figcaption>{escape(name)}</figcaption></figure>")
        else:
            parts.append(f'<p class="note">{escape(name)}: the image file is unreadable.</p>')
    return "".join(parts)


def _details(meta: dict, config: Any) -> str:
    keys = ("study", "seed", "status", "started", "finished", "wall_seconds", "torch_threads")
    rows = [
        f"<tr><td class=l>{escape(k)}</td><td class=l>{escape(_cell(meta.get(k)))}</td></tr>"
        for k in keys
    ]
    if meta.get("overrides"):
        rows.append(
            f"<tr><td class=l>overrides</td><td class=l>"
            f"{escape(' '.join(meta['overrides']))}</td></tr>"
        )
    out = f'<table class="meta">{"".join(rows)}</table>'
    versions = meta.get("versions")
    if isinstance(versions, dict) and versions:
        vrows = "".join(
            f"<tr><td class=l>{escape(str(k))}</td><td class=l>{escape(_cell(v))}</td></tr>"
            for k, v in sorted(versions.items())
        )
        out += f'<h3>Versions</h3><table class="versions">{vrows}</table>'
    else:
        out += "<p>Versions were not recorded.</p>"
    if meta.get("traceback"):
        out += (
            "<details><summary>Traceback</summary>"
            f"<pre>{escape(str(meta['traceback']))}</pre></details>"
        )
    cfg = json.dumps(config, indent=2, sort_keys=True) if config else "not recorded"
    return out + f"<details open><summary>Config</summary><pre>{escape(cfg)}</pre></details>"


def render_study(folder: str | os.PathLike) -> str:
    """The report page of a study folder, as a string."""
    run = RunFolder(folder)
    meta = run.read_json("meta.json", {})
    meta = meta if isinstance(meta, dict) else {}
    config = run.read_json("config.json", {})
    results = run.read_json(RESULTS, {})
    results = results if isinstance(results, dict) else {}
    status = str(meta.get("status") or "unknown")
    title = str(results.get("title") or meta.get("study") or run.path.name)
    banner = ""
    if status != "finished":
        text = f"STUDY {status.upper()}"
        if meta.get("message"):
            text += f": {meta['message']}"
        banner = f'<div class="banner failed">{escape(text)}</div>'
    summary = results.get("summary") or []
    if not isinstance(summary, list):
        summary = [str(summary)]
    summary_html = "".join(f"<li>{escape(str(s))}</li>" for s in summary)
    missing = "" if results else f'<p class="note">{RESULTS} is missing or unreadable.</p>'
    rows = results.get("rows") or []
    n_rows = len(rows) if isinstance(rows, list) else 0
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            f'<p class="sub">{escape(run.path.name)} · study <b>{escape(str(meta.get("study")))}'
            f"</b> · status <b>{escape(status)}</b> · seed {escape(_cell(meta.get('seed')))}</p>",
            banner,
            missing,
            f"<h2>Summary</h2><ul>{summary_html}</ul>" if summary_html else "",
            "<h2>Results</h2>",
            _table(results.get("table") or [], "table"),
            f"<details><summary>Per-item rows ({n_rows})</summary>",
            _table(rows if isinstance(rows, list) else [], "rows"),
            "</details>",
            "<h2>Figures</h2>",
            _figures(run.path),
            "<h2>Run details</h2>",
            _details(meta, config),
            f"<footer>Generated {escape(now_iso())} by fedleak.studies.report from the files in "
            "this folder.</footer></body></html>\n",
        ]
    )


def write_study_report(folder: str | os.PathLike) -> Path:
    """Write ``report.html`` into the study folder (atomically) and return its path."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"no study folder at {path}")
    return atomic_write_text(path / REPORT, render_study(path))


def save_line_plot(
    path: str | os.PathLike,
    series: list[tuple[str, list[float], list[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    logx: bool = False,
    hline: tuple[float, str] | None = None,
) -> Path:
    """One PNG with a line per ``(label, xs, ys)``; points a log axis cannot show are skipped.

    ``matplotlib.figure.Figure`` directly, never pyplot: no global backend state.
    """
    from matplotlib.figure import Figure  # here: rendering HTML alone needs no matplotlib

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    for label, xs, ys in series:
        pts = [
            (x, y)
            for x, y in zip(xs, ys, strict=True)
            if y is not None and math.isfinite(y) and (y > 0 or not logy) and (x > 0 or not logx)
        ]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "o-",
                label=label,
                linewidth=1.2,
                markersize=3 if len(pts) <= 10 else 0,
            )
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if series or hline:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
