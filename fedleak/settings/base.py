"""What every settings model shares: kebab-case keys, strict types, unknown keys refused with a
suggestion, and one-line errors that name the key.

The models are pydantic v2 (installed with Flower). TOML keys are kebab-case (``round-timeout``);
Python attributes are snake_case (``round_timeout``). Types are strict: TOML already types its
values, so a string where a number belongs is a mistake to report, not to coerce; an integer is
accepted where a float is expected. Non-finite floats are refused everywhere.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from fedleak.errors import ConfigError


def kebab(name: str) -> str:
    return name.replace("_", "-")


class Section(BaseModel):
    """A table of settings. Subclasses declare fields with types, defaults and ranges."""

    model_config = ConfigDict(
        alias_generator=kebab,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        validate_assignment=True,
        validate_default=True,
    )

    def to_toml_dict(self) -> dict[str, Any]:
        """Kebab-case keys, no None values (TOML has no null), as a preset would spell them."""
        return _drop_none(self.model_dump(by_alias=True))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


# --- errors --------------------------------------------------------------------------------


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the last element of ``loc`` (for 'did you mean')."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = next(
            (f for n, f in current.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside ``list[M]``, ``M | None`` and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def known_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def suggestion(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after", "function-before"))


def describe_error(model: type[BaseModel], error: dict[str, Any]) -> str:
    """One line for one pydantic error, naming the key the user wrote."""
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))
    key = dotted(loc)
    if error["type"] == "extra_forbidden":
        owner = _model_at(model, loc)
        prefix = dotted(loc[:-1]) + "." if len(loc) > 1 else ""
        keys = [prefix + k for k in known_keys(owner)] if owner else []
        return f"unknown key '{key}'{suggestion(key, keys)}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = error.get("input")
    # A value error of ours names the value already; pydantic's own messages do not.
    quiet = error["type"] == "value_error" or isinstance(got, dict | list) or got is None
    shown = "" if quiet else f" (got {got!r})"
    return f"{key}: {message[0].lower()}{message[1:]}{shown}" if key else f"{message}{shown}"


def validate(model: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """``model`` validated from ``data``, or a ConfigError whose first line names the problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = [describe_error(model, e) for e in err.errors()]
        more = f" (and {len(lines) - 1} more problem(s))" if len(lines) > 1 else ""
        raise ConfigError(f"{where}: {lines[0]}{more}") from None


# --- TOML and --set ------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file, or a one-line ConfigError saying what is wrong with it."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err


def parse_value(text: str) -> Any:
    """A ``--set`` value is TOML (``3``, ``0.1``, ``true``, ``"x"``, ``[1, 2]``); bare words are
    strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def split_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    return key.split("."), parse_value(raw.strip())


def set_in(tree: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    """Put ``value`` at ``path`` in a nested dict of TOML tables (lists indexed by number).
    Whether the key exists is the model's business: it reports unknown keys with suggestions."""
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override '{item}': '{'.'.join(path[: depth + 1])}' has {len(node)} entries "
                    f"(0..{len(node) - 1})"
                )
            node = node[int(part)]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"override '{item}': '{'.'.join(path[: depth + 1])}' is not a table")
        node = child
    if isinstance(node, list):
        raise ConfigError(f"override '{item}': name an entry, e.g. {'.'.join(path)}.0.key=value")
    node[path[-1]] = value
