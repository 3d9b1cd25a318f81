"""Shared fixtures: tests read real datasets from ../shared/data (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    env = os.environ.get("FEDLEAK_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _shared_data()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"test data not found at {root} (set FEDLEAK_TEST_DATA)")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep caches (trained evaluators) per test session, outside the user's home."""
    cache = os.environ.get("FEDLEAK_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("FEDLEAK_CACHE_DIR", cache)
    monkeypatch.setenv("FEDLEAK_DATA_ROOT", str(_shared_data()))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
