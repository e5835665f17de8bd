"""Helpers that derive CLI defaults from the config dataclasses, so flags cannot drift."""

from __future__ import annotations

import dataclasses

import click

__all__ = ["default_of", "CountOrAll", "save_figure"]


class CountOrAll(click.ParamType):
    """A non-negative integer, or ``all`` (returned as ``None``: no limit)."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "all":
            return None
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a whole number nor 'all'", param, ctx)
        if number < 0:
            self.fail(f"{value!r} is negative; give a number >= 0 or 'all'", param, ctx)
        return number


def default_of(config_class, name: str):
    """The default value of field ``name`` of a config dataclass."""
    for f in dataclasses.fields(config_class):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as a PNG through a temporary file and a rename, then close it."""
    import io

    import matplotlib.pyplot as plt

    from mechscope.paths import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
