"""Summary statistics, one way everywhere: the mean and the *sample* standard deviation (n - 1
in the denominator: the spread of independent repetitions, e.g. attacker trials or images)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

STD_NOTE = "± is the sample standard deviation (n - 1)"


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation; 0 for a single value
    n: int

    def __str__(self) -> str:
        return (
            f"{self.mean:.4g} ± {self.std:.2g} (n={self.n})" if self.n > 1 else f"{self.mean:.4g}"
        )


def summarize(values: Iterable[float]) -> Summary:
    """Mean and sample standard deviation of the finite values (NaN and inf are left out)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return Summary(math.nan, math.nan, 0)
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return Summary(statistics.fmean(kept), std, len(kept))
