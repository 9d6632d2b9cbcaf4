"""What every options object shares (``ScanOptions``, ``MergeOptions``): a validated copy with some
settings changed, reading a config table that names its unknown keys, and one default per setting
for the CLI. Torch-free, like the options themselves."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, TypeVar

from lorascope.errors import InputError

T = TypeVar("T", bound="Settings")


class Settings:
    """Mixin for frozen dataclasses whose ``__post_init__`` validates and raises ``InputError``."""

    def with_(self: T, **changes: Any) -> T:
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def from_mapping(cls: type[T], raw: dict[str, Any], where: str) -> T:
        """From a config table, naming ``where`` and the key on an unknown key or a bad value."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        try:
            return cls(**raw)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of one setting, for the CLI's options (each default is written once)."""
        return {f.name: f.default for f in fields(cls)}[name]  # type: ignore[arg-type]
