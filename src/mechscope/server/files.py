"""The served graph directory: names resolved strictly inside it, listing, and validated saves.

A graph name is a relative POSIX path such as ``dallas.json`` or ``runs/a.json`` (the URL path after
``/api/graphs/``, already percent-decoded by the server). Absolute names, ``..``, backslashes, NUL,
hidden components and symlinks that resolve outside the directory are refused, so the explorer can
never read or write another file of the machine.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mechscope.errors import BadInputError
from mechscope.export.schema import validate_neuronpedia
from mechscope.paths import atomic_file

__all__ = ["GraphDirectory", "GraphEntry", "UnsafePathError", "GraphNotFoundError"]


class UnsafePathError(BadInputError):
    """A graph name that would leave the served directory (HTTP 403)."""

    http_status = 403


class GraphNotFoundError(BadInputError):
    """A graph name inside the directory that names no graph file (HTTP 404)."""

    http_status = 404


@dataclass(frozen=True)
class GraphEntry:
    """One graph of the listing (``bytes``: file size; counts read from the JSON)."""

    name: str
    prompt: str
    slug: str
    scan: str
    n_nodes: int
    n_links: int
    n_supernodes: int
    bytes: int


class GraphDirectory:
    """Graph JSON files under ``root`` (searched recursively, symlinks out of ``root`` skipped).

    Raises:
        BadInputError: ``root`` is not a directory.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise BadInputError(f"graph directory {str(root)!r} does not exist; `mechscope trace` writes graphs "
                                "to ./graphs, or give the directory that holds your graph .json files")
        self._listing_cache: dict[Path, tuple[tuple[int, int], GraphEntry | None]] = {}
        self._write_lock = threading.Lock()

    def resolve(self, name: str) -> Path:
        """The file of graph ``name``.

        Raises:
            UnsafePathError: ``name`` is absolute, has ``..``, a backslash, NUL, a hidden component,
                does not end in ``.json``, or resolves (through symlinks) outside the directory.
            GraphNotFoundError: no such file.
        """
        pure = PurePosixPath(name)
        if (not name or pure.is_absolute() or "\\" in name or "\x00" in name or name.startswith("~")
                or any(part in ("", ".", "..") or part.startswith(".") for part in name.split("/"))):
            raise UnsafePathError(f"graph name {name!r} is not a plain relative path inside the served directory")
        if pure.suffix != ".json":
            raise UnsafePathError(f"graph name {name!r} does not end in .json; only graph JSON files are served")
        try:
            path = (self.root / pure).resolve()
            if not path.is_relative_to(self.root):
                raise UnsafePathError(f"graph name {name!r} resolves outside the served directory")
            found = path.is_file()
        except (OSError, RuntimeError) as e:  # a name too long, a symlink loop
            raise GraphNotFoundError(f"graph {name!r} cannot be opened: {e}") from e
        if not found:
            raise GraphNotFoundError(f"no graph {name!r} in the served directory; GET /api/graphs lists them")
        return path

    def names(self) -> list[str]:
        """Relative names of every servable ``*.json`` under the directory, sorted."""
        names = []
        for path in self.root.rglob("*.json"):
            if path.name == "graph.json" and (path.parent / "graph.safetensors").exists():
                continue  # the internal graph `trace` writes beside the exchange JSON, not a graph to explore
            name = path.relative_to(self.root).as_posix()
            try:
                self.resolve(name)
            except BadInputError:
                continue
            names.append(name)
        return sorted(names)

    def entries(self) -> list[GraphEntry]:
        """The listing: one :class:`GraphEntry` per graph (files that are not graph JSON are left out).
        Each file is parsed once per change of its size or modification time."""
        entries = []
        for name in self.names():
            path = self.root / name
            info = path.stat()
            key = (info.st_mtime_ns, info.st_size)
            cached = self._listing_cache.get(path)
            if cached is None or cached[0] != key:
                entry = _entry(name, path, info.st_size)
                cached = (key, entry)
                self._listing_cache[path] = cached
            if cached[1] is not None:
                entries.append(cached[1])
        return entries

    def save(self, name: str, data: dict) -> Path:
        """Overwrite the existing graph ``name`` with ``data`` after validating it against the schema,
        atomically (temporary file with the old file's permissions, then rename); saves are
        serialised. The file is compact UTF-8 JSON, so it is no larger than the request that sent it.

        Raises:
            UnsafePathError, GraphNotFoundError: as :meth:`resolve` (saving never creates files).
            BadInputError: ``data`` is not a valid graph (or nests too deeply, or holds text that is
                not Unicode, such as a lone surrogate); the file is left untouched.
        """
        path = self.resolve(name)
        try:
            validate_neuronpedia(data)
        except RecursionError as e:
            raise BadInputError("graph JSON nests too deeply to be a graph") from e
        try:
            payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except (UnicodeEncodeError, ValueError) as e:
            raise BadInputError(f"graph JSON holds a value that cannot be saved: {e}") from e
        with self._write_lock, atomic_file(path) as tmp:
            tmp.write_bytes(payload)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        return path


def _entry(name: str, path: Path, size: int) -> GraphEntry | None:
    """The listing entry of a file, or None when it is not a graph. Only the structure the listing
    reads is checked (full schema validation of a large graph takes seconds; saves do it)."""
    try:
        data = json.loads(path.read_bytes())
        meta, q = data["metadata"], data["qParams"]
        entry = GraphEntry(name, meta["prompt"], meta["slug"], meta["scan"], len(data["nodes"]), len(data["links"]),
                           len(q.get("supernodes", [])), size)
        if not (all(isinstance(x, str) for x in (entry.prompt, entry.slug, entry.scan))
                and isinstance(data["nodes"], list) and isinstance(data["links"], list)):
            return None
        f"{entry.name}{entry.prompt}{entry.slug}{entry.scan}".encode("utf-8")  # a lone surrogate: not listable
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):  # UnicodeError is a ValueError
        return None
    return entry
