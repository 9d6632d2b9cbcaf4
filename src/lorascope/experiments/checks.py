"""Checking config tables with pydantic: unknown keys and wrong types become one clear ``InputError``.

Every table of an experiment config is a pydantic model (or dataclass) with ``extra="forbid"`` and
strict types. :func:`validate` runs one and turns its errors into a message naming the file, the table
and the key, e.g. ``exp.toml [grid] (methods): unknown key(s) ['rank']; known: [...]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from lorascope.errors import InputError

STRICT = ConfigDict(extra="forbid", strict=True)
UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")


class Table(BaseModel):
    """A config table: unknown keys are refused, values are not coerced (an int is not a string)."""

    model_config = STRICT


def known_keys(cls: type) -> list[str]:
    fields = getattr(cls, "model_fields", None) or getattr(cls, "__dataclass_fields__", {})
    return sorted(fields)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(error: ValidationError, cls: type) -> str:
    """One line for every problem pydantic found: unknown keys together, then the others."""
    errors = error.errors()
    unknown = sorted(_loc(e["loc"]) for e in errors if e["type"] in UNKNOWN)
    parts = [f"unknown key(s) {unknown}; known: {known_keys(cls)}"] if unknown else []
    for e in errors:
        if e["type"] in UNKNOWN:
            continue
        key = _loc(e["loc"])
        if e["type"] == "missing":
            parts.append(f"no {key} given")
        elif e["type"] == "value_error":  # our own validators: the message names the key
            parts.append(str(e["ctx"]["error"]))
        else:
            parts.append(f"{key}: {e['msg'].lower()}, got {e['input']!r}")
    return "; ".join(parts)


def validate(cls: type, values: Any, where: str) -> Any:
    """``cls`` (a pydantic model or dataclass) from a table's values, or an InputError."""
    if not isinstance(values, dict):
        raise InputError(f"{where}: expected a table of key = value, got {values!r}")
    try:
        return cls.model_validate(values) if isinstance(cls, type) and issubclass(cls, BaseModel) else cls(**values)
    except ValidationError as e:
        raise InputError(f"{where}: {describe(e, cls)}") from None


def checked(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` inside a pydantic validator: an InputError becomes the ValueError pydantic reports."""
    try:
        return fn(*args)
    except InputError as e:
        raise ValueError(str(e)) from None


def each(ok: Callable[[Any], bool], message: str) -> AfterValidator:
    """A validator for a list field (``Annotated[list[int], each(...)]``): every item must pass ``ok``,
    else ``message`` (``{}`` stands for the item) is the error."""

    def check(items: list[Any] | None) -> list[Any] | None:
        for item in items or []:
            if not ok(item):
                raise ValueError(message.format(repr(item)))
        return items

    return AfterValidator(check)
