"""Helpers that derive CLI defaults from the config dataclasses, so flags cannot drift."""

from __future__ import annotations

import dataclasses

__all__ = ["default_of"]


def default_of(config_class, name: str):
    """The default value of field ``name`` of a config dataclass."""
    for f in dataclasses.fields(config_class):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)
