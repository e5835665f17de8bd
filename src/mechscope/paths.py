"""Where mechscope keeps caches: converted models, corpora, checkpoints.

The cache root is ``$MECHSCOPE_HOME`` when set, else ``~/.cache/mechscope``. Nothing is created at
import time; callers create the sub-directories they write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["cache_root", "atomic_file", "atomic_write_bytes", "atomic_write_text", "atomic_directory"]


def cache_root() -> Path:
    """Return the cache root directory (not created)."""
    env = os.environ.get("MECHSCOPE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mechscope"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name (such as
    ``safetensors.torch.save_file``); when the block succeeds the file is synced and renamed onto
    ``path``, so readers never see a half-written file and a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")  # one per writing thread
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; when the block succeeds it replaces
    ``path`` (old copy moved aside, then removed), so a crash leaves the previous directory whole;
    a block that raises (or is interrupted) leaves ``path`` untouched and no temporary directory.
    Used for resumable checkpoints, transcoder sets and converted models."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
