"""Reading a transcoder set's safetensors files with errors that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mechscope.errors import CorruptFileError

__all__ = ["read_safetensors"]


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``file``.

    Raises:
        CorruptFileError: the file is missing, truncated or not safetensors.
    """
    if not file.exists():
        raise CorruptFileError(f"transcoder file {file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"cannot read {file}: it is truncated or not a safetensors file ({e})") from e
