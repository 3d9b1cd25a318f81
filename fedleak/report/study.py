"""The report of a study folder: summary, aggregate table, per-item rows, every figure, and the
run's details. ``results.json`` is what the study wrote (``fedleak.studies``' contract)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedleak.report.page import fmt, write_page
from fedleak.runfolder import RunFolder

RESULTS = "results.json"


def _columns(rows: list[dict]) -> list[str]:
    """The union of the rows' keys in first-seen order (the study's own column order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _grid(rows: Any) -> tuple[list[str], list[list[str]]]:
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    columns = _columns(rows)
    return columns, [[fmt(r.get(c), 4, "g") for c in columns] for r in rows]


def write_study_report(run: RunFolder) -> Path:
    results = run.read_json(RESULTS, {})
    results = results if isinstance(results, dict) else {}
    meta = run.read_json("meta.json", {}) or {}
    summary = results.get("summary") or []
    table_header, table_rows = _grid(results.get("table"))
    rows_header, rows = _grid(results.get("rows"))
    figures = sorted(p for p in run.path.rglob("*.png") if p.is_file())
    return write_page(
        run,
        "study.html",
        title=str(results.get("title") or meta.get("study") or run.path.name),
        study=str(meta.get("study") or meta.get("preset") or "—"),
        missing=not results,
        summary=summary if isinstance(summary, list) else [str(summary)],
        table_header=table_header,
        table_rows=table_rows,
        rows_header=rows_header,
        rows=rows,
        figures=[(p, p.relative_to(run.path).as_posix()) for p in figures],
        overrides=" ".join(meta.get("overrides") or []),
    )
