"""What a person reads: report pages (Jinja2 templates, one base and shared macros), image grids
and plots. :func:`write_report` writes any run folder's ``report.html``, by the run's kind."""

from __future__ import annotations

import os
from pathlib import Path

from fedleak.runfolder import META, RunFolder


def write_report(run_dir: str | os.PathLike) -> Path:
    """Regenerate ``report.html`` (and the plots it shows) in ``run_dir``."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no run folder at {path}")
    run = RunFolder(path)
    meta = run.read_json(META, {})
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "study" or (kind is None and (path / "results.json").is_file()):
        from fedleak.report.study import write_study_report

        return write_study_report(run)
    if kind == "ensembler":
        from fedleak.report.ensembler import write_ensembler_report

        return write_ensembler_report(run)
    from fedleak.report.federation import write_federation_report

    return write_federation_report(run)
