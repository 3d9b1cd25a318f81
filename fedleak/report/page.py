"""What every report page shares: the Jinja2 environment (autoescaping on), the one number
formatter, durations, images inlined as data URIs, and the run-details context.

A report must render whatever a run left behind, a killed run with torn logs and no images
included, so every helper degrades to a dash or a sentence instead of raising.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from fedleak.runfolder import CONFIG, META, REPORT, RunFolder, atomic_write_text, now_iso
from fedleak.stats import STD_NOTE

_PNG = b"\x89PNG\r\n\x1a\n"
STATUS_TEXT = {
    "failed": "RUN FAILED",
    "degraded": "RUN DEGRADED: it completed, but not everything its results rest on held",
    "stopped": "RUN STOPPED (Ctrl-C or its time budget)",
    "running": "RUN NOT FINISHED: status is still 'running' (in progress, or killed)",
}


def number(value: Any) -> float | None:
    """A finite float, or None for missing, null, bool or non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any, digits: int = 3, style: str = "f") -> str:
    """The one number formatter: ints as ints, floats with ``digits`` decimals (``style="g"``:
    significant digits, for values spanning magnitudes), booleans as yes/no, lists and tables
    as compact JSON, missing or non-finite values as an em dash."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    v = number(value)
    if v is None:
        return "—"
    return str(int(v)) if isinstance(value, int) else f"{v:.{digits}{style}}"


def signed(value: Any, digits: int = 2) -> str:
    v = number(value)
    return "—" if v is None else f"{v:+.{digits}f}"


def duration(seconds: Any) -> str:
    s = number(seconds)
    if s is None or s < 0:
        return "—"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def data_uri(path: Path) -> str:
    """A PNG inlined as a data URI; '' when it is missing or not a PNG (a torn write)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    if not data.startswith(_PNG):
        return ""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


_ENV = Environment(
    loader=PackageLoader("fedleak.report", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters.update(fmt=fmt, signed=signed, duration=duration, data_uri=data_uri)


def render(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)


def run_context(run: RunFolder) -> dict[str, Any]:
    """What the base template shows for any run: status, banner, details, config, versions."""
    meta = run.read_json(META, {})
    meta = meta if isinstance(meta, dict) else {}
    config = run.read_json(CONFIG, {})
    status = str(meta.get("status") or "unknown")
    banner = ""
    if status != "finished":
        banner = STATUS_TEXT.get(status, f"RUN STATUS UNKNOWN ({status})")
        if meta.get("message"):
            banner += f": {meta['message']}"
    took = number(meta.get("wall_seconds"))
    if took is None:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            took = (
                _dt.datetime.fromisoformat(meta["finished"])
                - _dt.datetime.fromisoformat(meta["started"])
            ).total_seconds()
    versions = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
    return {
        "run_name": run.path.name,
        "run_path": str(run.path.resolve()),
        "meta": meta,
        "status": status,
        "banner": banner,
        "took": took,
        "versions": sorted(versions.items()),
        "config_text": json.dumps(config, indent=2, sort_keys=True) if config else "",
        "logs": sorted(p.name for p in (run.path / "logs").glob("*.log")),
        "generated": now_iso(),
        "std_note": STD_NOTE,
    }


def write_page(run: RunFolder, template: str, **context: Any) -> Path:
    html = render(template, **run_context(run), **context)
    return atomic_write_text(run.path / REPORT, html)
