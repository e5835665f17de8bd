"""Save and load attribution graphs: ``graph.safetensors`` (tensors) + ``graph.json`` (the rest).

No pickle. ``graph.json`` holds the schema version, prompt, tokens, model and transcoder ids, logit
tokens and the attribution config; ``graph.safetensors`` holds ``input_ids``, ``active_features``,
``activation_values``, ``selected_features``, ``logit_token_ids``, ``logit_probabilities`` and
``adjacency``. Both files are written through a temporary file and a rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mechscope.errors import CorruptFileError
from mechscope.graph.graph import Graph
from mechscope.paths import atomic_file, atomic_write_text

__all__ = ["save_graph", "load_graph", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_TENSORS = ("input_ids", "active_features", "activation_values", "selected_features",
            "logit_token_ids", "logit_probabilities", "adjacency")


def save_graph(graph: Graph, directory: str | os.PathLike) -> Path:
    """Write ``graph`` into ``directory`` (created). Returns the directory."""
    directory = Path(directory)
    tensors = {name: getattr(graph, name).contiguous() for name in _TENSORS}
    meta = {
        "schema_version": SCHEMA_VERSION,
        "prompt": graph.prompt,
        "input_tokens": graph.input_tokens,
        "model_id": graph.model_id,
        "transcoder_set": graph.transcoder_set,
        "n_layers": graph.n_layers,
        "logit_tokens": graph.logit_tokens,
        "config": graph.config,
    }
    with atomic_file(directory / "graph.safetensors") as tmp:  # no in-memory copy of the whole file
        save_file(tensors, tmp)
    atomic_write_text(directory / "graph.json", json.dumps(meta, indent=1))
    return directory


def load_graph(directory: str | os.PathLike) -> Graph:
    """Read a graph written by :func:`save_graph`.

    Raises:
        CorruptFileError: a file is missing, truncated, or of another schema version.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / "graph.json").read_text())
        tensors = load_file(str(directory / "graph.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise CorruptFileError(f"cannot read the graph in {directory}: {e}") from e
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CorruptFileError(
            f"{directory} has graph schema version {meta.get('schema_version')}, this mechscope reads {SCHEMA_VERSION}"
        )
    return Graph(
        prompt=meta["prompt"],
        input_tokens=meta["input_tokens"],
        model_id=meta["model_id"],
        transcoder_set=meta["transcoder_set"],
        n_layers=meta["n_layers"],
        logit_tokens=meta["logit_tokens"],
        config=meta["config"],
        **{name: tensors[name] for name in _TENSORS},
    )
