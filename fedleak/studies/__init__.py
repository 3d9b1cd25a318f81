"""Studies: single-process experiments (no federation) that sweep an attack or a defense.

A study is a module with ``run(cfg, run) -> dict`` and a preset
``fedleak/studies/presets/<name>.toml``. The preset is the schema: ``--set a.b=value`` may only
change a key it has (any depth), with a value of the same type. Top-level keys every preset has:
``description`` (one line) and ``seed`` (int; ``torch.manual_seed`` is set to it before ``run``).

Contract of ``run``: write ``results.json`` into ``run.path`` =
``{"title", "summary": [sentences], "rows": [per-item dicts], "table": [aggregate dicts]}``
plus any PNGs, and return the same dict (``run_study`` writes it if the module did not).
``write_results`` keeps the dicts' key order, which the report uses as column order.
A module may also define ``validate(cfg)``, raising ``ValueError`` for a bad setting: it runs
before the run folder is created, so a typo costs no folder.
``run_study`` owns config.json, meta.json and report.html; a failing study still leaves its
meta (status ``failed`` and the error), whatever it wrote, and a report.
"""

from __future__ import annotations

import copy
import importlib
import json
import time
import tomllib
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fedleak.config import parse_value
from fedleak.errors import ConfigError, FedleakError
from fedleak.runfolder import RunFolder, atomic_write_text, now_iso, to_jsonable

STUDIES: dict[str, str] = {
    "dlg-models": "fedleak.studies.dlg_models",
    "inversion-defenses": "fedleak.studies.defenses",
    "gias-vs-ig": "fedleak.studies.gias_vs_ig",
    "batch-sizes": "fedleak.studies.batch_sizes",
}
RESULTS = "results.json"


class StudyFailed(FedleakError):
    """The study raised; ``run_dir`` holds what it wrote before."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


def write_results(run: RunFolder, results: dict[str, Any]) -> Path:
    """results.json, atomically, keys in insertion order (the report's column order)."""
    text = json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(run.file(RESULTS), text)


def study_names() -> list[str]:
    return sorted(STUDIES)


def _preset_text(name: str) -> str:
    if name not in STUDIES:
        raise ConfigError(f"unknown study '{name}' (known: {', '.join(study_names())})")
    path = resources.files("fedleak.studies").joinpath("presets", f"{name}.toml")
    try:
        return path.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"study '{name}' has no preset file presets/{name}.toml") from None


def coerce(key: str, default: Any, value: Any) -> Any:
    """``value`` if it has the type of the preset's ``default`` (an int is accepted for a float)."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"study key '{key}' expects {type(default).__name__}, got {value!r}")
    return value


def apply_override(cfg: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` to ``cfg`` in place; the key must exist and not be a table."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ConfigError(f"unknown study key '{key}'")
    if not isinstance(node, dict) or leaf not in node or isinstance(node[leaf], dict):
        raise ConfigError(f"unknown study key '{key}'")
    node[leaf] = coerce(key, node[leaf], parse_value(raw.strip()))


def load_study_preset(name: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The study's preset with ``--set`` overrides applied (strict: known keys and types)."""
    try:
        cfg = tomllib.loads(_preset_text(name))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"preset of study '{name}' is not valid TOML: {err}") from err
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg


def study_description(name: str) -> str:
    """The preset's one-line description (or why there is none, for ``--list``)."""
    try:
        return str(load_study_preset(name).get("description", ""))
    except ConfigError as err:
        return f"(unavailable: {err})"


def run_study(name: str, overrides: list[str] | None = None, out_dir: str | Path = "runs") -> Path:
    """Run study ``name`` in a fresh ``out_dir/<timestamp>-<name>`` folder; return the folder.

    Raises :class:`StudyFailed` (after recording it) if the study raises.
    """
    from fedleak.studies.report import write_study_report

    cfg = load_study_preset(name, overrides)  # bad overrides stop before any folder exists
    try:
        module = importlib.import_module(STUDIES[name])
    except ImportError as err:
        raise ConfigError(f"study '{name}' cannot be loaded: {err}") from err
    validate = getattr(module, "validate", None)
    if validate is not None:
        try:
            validate(cfg)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"study '{name}': {err}") from err
    run = RunFolder.create(out_dir, name)
    run.write_json("config.json", cfg)
    seed = cfg.get("seed")
    run.write_meta(
        study=name,
        preset=name,
        description=cfg.get("description", ""),
        seed=seed,
        overrides=list(overrides or []),
        versions=RunFolder.versions(),
        status="running",
        started=now_iso(),
    )
    start = time.perf_counter()
    threads = torch.get_num_threads()  # studies set their own; restore it for the caller
    error: BaseException | None = None
    try:
        if isinstance(seed, int):
            torch.manual_seed(seed)
        results = module.run(copy.deepcopy(cfg), run)
        if isinstance(results, dict) and not run.file(RESULTS).exists():
            write_results(run, results)
        run.write_meta(status="finished")
    except KeyboardInterrupt:
        run.write_meta(status="interrupted", message="interrupted (Ctrl-C)")
        raise
    except Exception as exc:
        error = exc
        run.write_meta(
            status="failed",
            message=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
        )
    finally:
        run.write_meta(
            finished=now_iso(),
            wall_seconds=round(time.perf_counter() - start, 2),
            torch_threads=torch.get_num_threads(),
        )
        torch.set_num_threads(threads)
        write_study_report(run.path)
    if error is not None:
        raise StudyFailed(
            f"study {name} failed: {type(error).__name__}: {error} (partial results in {run.path})",
            run.path,
        ) from error
    return run.path
