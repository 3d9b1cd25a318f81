"""Round-by-round plots of a run folder's metrics.jsonl and attack.jsonl.

Uses ``matplotlib.figure.Figure`` directly (never pyplot): no global backend, no display,
safe to call from any thread.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedleak.runfolder import ATTACK, CONFIG, METRICS, RunFolder, atomic_write_bytes

# Hitaj et al. do not give a number; 15 is the testbed's default for [-1, 1] 32x32 images.
DEFAULT_REALISM_THRESHOLD = 15.0
VARIANT_ORDER = ("active", "passive", "model-inversion")


def realism_threshold(config: Any) -> float:
    """The config's ``eval.realism-threshold``, else the default."""
    try:
        value = float(config["eval"]["realism-threshold"])
    except (KeyError, TypeError, ValueError):
        return DEFAULT_REALISM_THRESHOLD
    return value if math.isfinite(value) else DEFAULT_REALISM_THRESHOLD


def number(value: Any) -> float | None:
    """A finite float, or None for missing, null, bool or non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


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


def _plot_attack(attack: list[dict], threshold: float, path: Path) -> Path | None:
    groups = by_variant(attack)
    if not any(
        series(recs, k)[0]
        for recs in groups.values()
        for k in ("target_rate", "nn_ssim_target", "nn_l2_median", "diversity")
    ):
        return None
    fig = Figure(figsize=(11, 7), layout="constrained")
    ax_rate, ax_ssim, ax_l2, ax_div = fig.subplots(2, 2, sharex=True).ravel()
    colors = [f"C{i}" for i in range(10)]
    for i, (variant, recs) in enumerate(groups.items()):
        c = colors[i % len(colors)]
        wins = [r for r in recs if r.get("success") is True]
        _line(ax_rate, series(recs, "target_rate"), variant, color=c)
        _line(ax_rate, series(wins, "target_rate"), f"{variant}: success", c, "*", ms=12, ls="")
        _line(ax_ssim, series(recs, "nn_ssim_target"), f"{variant}: vs target class", c)
        _line(
            ax_ssim, series(recs, "nn_ssim_other"), f"{variant}: vs other classes", c, "x", ls="--"
        )
        _line(ax_l2, series(recs, "nn_l2_median"), variant, c)
        _line(ax_div, series(recs, "diversity"), variant, c)
    ax_l2.axhline(threshold, ls="--", color="k", lw=1, label=f"realism threshold {threshold:g}")
    ax_rate.set(title="evaluator: samples classified as the target", ylim=(-0.02, 1.02))
    ax_ssim.set(title="SSIM to nearest real image (higher = closer)")
    ax_l2.set(title="median L2 to nearest real image (lower = closer)")
    ax_div.set(title="sample diversity")
    for ax in (ax_rate, ax_ssim, ax_l2, ax_div):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best", fontsize="x-small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in (ax_l2, ax_div):
        ax.set_xlabel("round")
    return _save(fig, path)


def plot_metrics(run: RunFolder) -> list[Path]:
    """Write plots/accuracy.png and plots/attack.png; a plot with no data is skipped."""
    config = run.read_json(CONFIG, {})
    written = [
        _plot_accuracy(run.read_jsonl(METRICS), run.path / "plots" / "accuracy.png"),
        _plot_attack(
            run.read_jsonl(ATTACK), realism_threshold(config), run.path / "plots" / "attack.png"
        ),
    ]
    return [p for p in written if p is not None]
