"""Where fedleak keeps what it computes once and reuses: trained evaluators, realism
calibrations, decoded datasets, generative priors, Ensembler bundles."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of fedleak's caches: ``$FEDLEAK_CACHE_DIR`` or ``~/.cache/fedleak``."""
    env = os.environ.get("FEDLEAK_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fedleak"
