"""Class specs as presets write them: ``"0-4,7"`` (or a list of ints), parsed without numpy or
torch so that settings validate before any heavy import."""

from __future__ import annotations

import re
from collections.abc import Sequence

from fedleak.errors import ConfigError

_RANGE = re.compile(r"([0-9]+)\s*-\s*([0-9]+)")
_INT = re.compile(r"[0-9]+")


def parse_classes(spec: str | Sequence[int]) -> list[int]:
    """Accept config-friendly class specs ("0-4,7") as well as plain lists."""
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            return []
        out: set[int] = set()
        for token in (t.strip() for t in text.split(",")):
            match = _RANGE.fullmatch(token)
            if match:
                lo, hi = int(match[1]), int(match[2])
                if lo > hi:
                    raise ConfigError(f"bad class spec {spec!r}: range {token!r} is reversed")
                out.update(range(lo, hi + 1))
            elif _INT.fullmatch(token):
                out.add(int(token))
            else:
                raise ConfigError(
                    f"bad class spec {spec!r}: cannot parse {token!r} "
                    "(use e.g. '0,1,2', '0-4' or '0-4,7')"
                )
        return sorted(out)
    try:
        values = list(spec)
    except TypeError:
        raise ConfigError(f"bad class spec {spec!r}: expected a string or a list") from None
    ints = []
    for v in values:
        # numpy integers pass too: they have __index__, floats do not
        if isinstance(v, bool) or not hasattr(v, "__index__") or v < 0:
            raise ConfigError(f"bad class spec {spec!r}: {v!r} is not a non-negative integer")
        ints.append(v.__index__())
    return sorted(set(ints))


def format_classes(classes: Sequence[int]) -> str:
    """The canonical spec: sorted, consecutive runs joined (``[0, 1, 2, 4]`` -> ``"0-2,4"``)."""
    runs: list[list[int]] = []
    for c in sorted(set(classes)):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
