"""Round-by-round plots of a run folder's metrics.jsonl and attack.jsonl.

Uses ``matplotlib.figure.Figure`` directly (never pyplot): no global backend, no display,
safe to call from any thread.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedleak.report.page import number
from fedleak.runfolder import ATTACK, CONFIG, METRICS, RunFolder, atomic_write_bytes

VARIANT_ORDER = ("active", "passive", "model-inversion")


def realism_threshold(config: Any) -> float | None:
    """The settings' ``eval.realism-threshold`` (None when it is off or not recorded)."""
    try:
        value = float(config["eval"]["realism-threshold"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def flat_attack(record: dict) -> dict:
    """An attack.jsonl record with its measures beside round, variant and success."""
    return {**record.get("measures", {}), **{k: v for k, v in record.items() if k != "measures"}}


def flat_metrics(record: dict) -> dict:
    """A metrics.jsonl record with the first attacker's victim cost as ``test_to_fake``."""
    victims = record.get("victims") or []
    return {**record, "test_to_fake": victims[0].get("to_fake") if victims else None}


def series(records: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    """(rounds, values) for the records that have both a round and a finite ``key``."""
    xs: list[float] = []
    ys: list[float] = []
    for rec in records:
        x, y = number(rec.get("round")), number(rec.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def by_variant(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Attack records grouped by variant, known variants first, each sorted by round."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(str(rec.get("variant") or "unknown"), []).append(rec)
    order = sorted(groups, key=lambda v: (VARIANT_ORDER + (v,)).index(v))
    return {v: sorted(groups[v], key=lambda r: number(r.get("round")) or 0.0) for v in order}


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _plot_accuracy(metrics: list[dict], path: Path) -> Path | None:
    acc, fake = series(metrics, "test_accuracy"), series(metrics, "test_to_fake")
    if not acc[0] and not fake[0]:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if acc[0]:
        ax.plot(*acc, marker=".", label="shared model test accuracy")
    if fake[0]:
        ax.plot(
            *fake,
            marker=".",
            color="tab:red",
            label="target-class test images classified as the fake class",
        )
    ax.set(xlabel="round", ylabel="fraction", ylim=(-0.02, 1.02), title="Shared model")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def _line(
    ax: Any,
    xy: tuple[list[float], list[float]],
    label: str,
    color: str,
    marker: str = ".",
    **kw: Any,
) -> None:
    # Empty series would still add a legend entry for a variant that has no such score.
    if xy[0]:
        ax.plot(*xy, marker=marker, color=color, label=label, **kw)


def _plot_attack(attack: list[dict], threshold: float | None, path: Path) -> Path | None:
    groups = by_variant(attack)
    if not any(
        series(recs, k)[0]
        for recs in groups.values()
        for k in ("target_rate", "fd", "nn_l2_median", "diversity")
    ):
        return None
    fig = Figure(figsize=(11, 7), layout="constrained")
    ax_rate, ax_fd, ax_l2, ax_div = fig.subplots(2, 2, sharex=True).ravel()
    colors = [f"C{i}" for i in range(10)]
    for i, (variant, recs) in enumerate(groups.items()):
        c = colors[i % len(colors)]
        wins = [r for r in recs if r.get("success") is True]
        _line(ax_rate, series(recs, "target_rate"), variant, color=c)
        _line(ax_rate, series(wins, "target_rate"), f"{variant}: success", c, "*", ms=12, ls="")
        _line(ax_fd, series(recs, "fd"), f"{variant}: FD", c)
        _line(ax_fd, series(recs, "fd_threshold"), f"{variant}: threshold", c, "", ls="--")
        _line(ax_l2, series(recs, "nn_l2_median"), variant, c)
        _line(ax_div, series(recs, "diversity"), variant, c)
    if threshold is not None:
        ax_l2.axhline(threshold, ls="--", color="k", lw=1, label=f"proximity bound {threshold:g}")
    ax_rate.set(title="evaluator: samples classified as the target", ylim=(-0.02, 1.02))
    ax_fd.set(title="Fréchet distance to real target images (below threshold = realistic)")
    ax_l2.set(title="median L2 to nearest real image (proximity, not realism)")
    ax_div.set(title="sample diversity")
    for ax in (ax_rate, ax_fd, ax_l2, ax_div):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best", fontsize="x-small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in (ax_l2, ax_div):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def plot_metrics(run: RunFolder) -> list[Path]:
    """Write plots/accuracy.png and plots/attack.png; a plot with no data is skipped."""
    config = run.read_json(CONFIG, {})
    metrics = [flat_metrics(r) for r in run.read_jsonl(METRICS)]
    attack = [flat_attack(r) for r in run.read_jsonl(ATTACK)]
    written = [
        _plot_accuracy(metrics, run.path / "plots" / "accuracy.png"),
        _plot_attack(attack, realism_threshold(config), run.path / "plots" / "attack.png"),
    ]
    return [p for p in written if p is not None]


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
