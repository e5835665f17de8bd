"""Helpers that derive CLI defaults from the config dataclasses, so flags cannot drift."""

from __future__ import annotations

import dataclasses

import click

__all__ = ["default_of", "CountOrAll", "save_figure", "Placement", "placement_options"]


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


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a command runs its model: ``--device``, ``--dtype``, ``--device-map``
    (see :mod:`mechscope.devices`)."""

    device: str = "auto"
    dtype: str = "float32"
    device_map: str | None = None

    def load_model(self, name: str):
        """The model ``name`` on this placement (errors as :func:`mechscope.models.loading.load_model`)."""
        from mechscope.models.loading import load_model

        return load_model(name, dtype=self.dtype, device=self.device, device_map=self.device_map)


def placement_options(dtype_help: str = "Model weights' precision; transcoders and edges stay float32.",
                      device_map: bool = True):
    """Add ``--device``, ``--dtype`` (and ``--device-map``) to a command; it receives them as one
    ``placement`` argument, a :class:`Placement`."""
    import functools

    from mechscope.devices import DTYPES

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            placement = Placement(kwargs.pop("device"), kwargs.pop("dtype"), kwargs.pop("device_map", None))
            return command(*args, placement=placement, **kwargs)

        options = [
            click.option("--device", default="auto", show_default=True,
                         help="cpu | cuda | cuda:N | mps | auto (CUDA when present, else CPU)."),
            click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
                         help=dtype_help),
        ]
        if device_map:
            options.append(click.option("--device-map", type=click.Choice(["auto"]), default=None,
                                        help="Spread a model too big for one GPU over every visible GPU "
                                             "(per-layer transcoders follow their layer)."))
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate
