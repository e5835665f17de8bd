"""Reading a transcoder set's safetensors files with errors that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mechscope.errors import CorruptFileError

__all__ = ["read_safetensors", "open_safetensors"]


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``file``.

    Raises:
        CorruptFileError: the file is missing, truncated or not safetensors.
    """
    return _checked(file, load_file)


def open_safetensors(file: Path):
    """A ``safe_open`` handle of ``file`` (memory-mapped; tensors and slices are read on demand).
    safetensors checks the header against the file's size when opening, so a truncated file fails here.

    Raises:
        CorruptFileError: the file is missing, truncated or not safetensors.
    """
    from safetensors import safe_open

    return _checked(file, lambda name: safe_open(name, framework="pt"))


def _checked(file: Path, read):
    """``read(str(file))`` with a missing, truncated or foreign file as a :class:`CorruptFileError`."""
    if not file.exists():
        raise CorruptFileError(f"transcoder file {file} is missing")
    try:
        return read(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"cannot read {file}: it is truncated or not a safetensors file ({e})") from e
