"""Studies: single-process experiments (no federation) that sweep an attack or a defense.

A study is a module with ``run(cfg, run) -> dict``, settings in ``fedleak.settings.studies`` and a
preset ``fedleak/presets/studies/<name>.toml``; ``fedleak.settings.studies.STUDIES`` lists them.
``run`` receives the validated settings as a dict of TOML keys (``cfg["attack"]["name"]``).

Contract of ``run``: write ``results.json`` into ``run.path`` =
``{"title", "summary": [sentences], "rows": [per-item dicts], "table": [aggregate dicts]}``
plus any PNGs, and return the same dict (``run_study`` writes it if the module did not).
``write_results`` keeps the dicts' key order, which the report uses as column order.
A module may also define ``validate(cfg)``, raising ``ValueError`` for a bad setting: it runs
before the run folder is created, so a typo costs no folder.
The run lifecycle (config, meta, status, report at every exit) is ``fedleak.runfolder.open_run``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from fedleak.errors import ConfigError
from fedleak.runfolder import RunFolder, Status, atomic_write_text, open_run, to_jsonable
from fedleak.settings import load_study
from fedleak.settings.studies import STUDIES

RESULTS = "results.json"


def write_results(run: RunFolder, results: dict[str, Any]) -> Path:
    """results.json, atomically, keys in insertion order (the report's column order)."""
    text = json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(run.file(RESULTS), text)


def study_names() -> list[str]:
    return sorted(STUDIES)


def run_study(
    name: str, overrides: list[str] | None = None, out_dir: str | Path = "runs"
) -> tuple[Path, Status]:
    """Run study ``name`` in a fresh ``out_dir/<timestamp>-<name>`` folder; returns the folder
    and how it ended. An exception inside the study is recorded (status failed, traceback) and
    raised again."""
    import torch

    from fedleak.report import write_report

    settings = load_study(name, overrides)  # bad overrides stop before any folder exists
    cfg = settings.to_toml_dict()
    try:
        module = importlib.import_module(STUDIES[name][1])
    except ImportError as err:
        raise ConfigError(f"study '{name}' cannot be loaded: {err}") from err
    validate = getattr(module, "validate", None)
    if validate is not None:
        try:
            validate(cfg)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"study '{name}': {err}") from err
    meta = {
        "study": name,
        "preset": name,
        "description": settings.description,
        "seed": settings.seed,
        "overrides": list(overrides or []),
        "device": "cpu",
    }
    threads = torch.get_num_threads()  # studies set their own; restore it for the caller
    with open_run(out_dir, name, kind="study", config=cfg, meta=meta, report=write_report) as (
        run,
        outcome,
    ):
        try:
            torch.manual_seed(settings.seed)
            results = module.run(cfg, run)
            if isinstance(results, dict) and not run.file(RESULTS).exists():
                write_results(run, results)
        finally:
            run.write_meta(torch_threads=torch.get_num_threads())
            torch.set_num_threads(threads)
    return run.path, outcome.status
