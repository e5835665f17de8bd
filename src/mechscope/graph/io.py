"""Save and load attribution graphs: ``graph.safetensors`` (tensors) + ``graph.json`` (the rest).

No pickle. ``graph.json`` holds the schema version, prompt, tokens, model and transcoder ids, logit
tokens, the attribution config and which edges were kept (``edges``: ``all`` or ``pruned``, with
the thresholds); ``graph.safetensors`` holds ``input_ids``, ``active_features``,
``activation_values``, ``selected_features``, ``logit_token_ids``, ``logit_probabilities`` and the
adjacency as coordinates: ``edge_index [2, n_edges]`` (int32 target row, source column) and
``edge_weight [n_edges]`` (float32), plus ``node_mask [n_nodes]`` for a pruned graph. The size is
proportional to the edges kept: ``mechscope trace`` keeps the pruned graph's edges (the README
graph: 169k edges, about 2 MB, instead of a 268 MB dense ``[8186, 8186]`` matrix) unless
``--full-graph``. Schema 1 files (a dense ``adjacency``) still load. Both files are written through
a temporary file and a rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mechscope.errors import CorruptFileError
from mechscope.graph.graph import Graph
from mechscope.graph.prune import PruneResult, kept_edges
from mechscope.paths import atomic_file, atomic_write_text

__all__ = ["save_graph", "load_graph", "saved_edges", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2
_READABLE = (1, 2)
_TENSORS = ("input_ids", "active_features", "activation_values", "selected_features",
            "logit_token_ids", "logit_probabilities")


def _edge_coordinates(adjacency: torch.Tensor, pruned: PruneResult | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edge_index [2, n] int32, edge_weight [n] float32)`` of the non-zero entries (those ``pruned``
    keeps, when given), gathered in row blocks so no N x N index tensor is made."""
    indices, weights = [torch.zeros(2, 0, dtype=torch.int32)], [torch.zeros(0, dtype=torch.float32)]
    for targets, sources, block_weights in kept_edges(adjacency, pruned):
        indices.append(torch.stack([targets, sources]).to(torch.int32))
        weights.append(block_weights.float())
    return torch.cat(indices, 1).contiguous(), torch.cat(weights).contiguous()


def save_graph(graph: Graph, directory: str | os.PathLike, pruned: PruneResult | None = None, thresholds: tuple[float, float] | None = None) -> Path:
    """Write ``graph`` into ``directory`` (created). Returns the directory.

    Args:
        pruned: a :class:`~mechscope.graph.prune.PruneResult`: keep only its edges (and record its
            node mask); ``None`` keeps every non-zero edge.
        thresholds: ``(node_threshold, edge_threshold)`` of ``pruned``, recorded in ``graph.json``.
    """
    directory = Path(directory)
    tensors = {name: getattr(graph, name).contiguous() for name in _TENSORS}
    tensors["edge_index"], tensors["edge_weight"] = _edge_coordinates(graph.adjacency, pruned)
    if pruned is not None:
        tensors["node_mask"] = pruned.node_mask.contiguous()
    edges = {"kept": "all"} if pruned is None else {"kept": "pruned", "node_threshold": thresholds and thresholds[0],
                                                    "edge_threshold": thresholds and thresholds[1]}
    meta = {
        "schema_version": SCHEMA_VERSION,
        "prompt": graph.prompt,
        "input_tokens": graph.input_tokens,
        "model_id": graph.model_id,
        "transcoder_set": graph.transcoder_set,
        "n_layers": graph.n_layers,
        "logit_tokens": graph.logit_tokens,
        "n_nodes": graph.n_nodes,
        "edges": {**edges, "n_edges": int(tensors["edge_weight"].numel())},
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
    if meta.get("schema_version") not in _READABLE:
        raise CorruptFileError(
            f"{directory} has graph schema version {meta.get('schema_version')}, this mechscope reads {list(_READABLE)}"
        )
    if "adjacency" in tensors:  # schema 1: dense
        adjacency = tensors["adjacency"]
    else:
        n = int(meta["n_nodes"])
        adjacency = torch.zeros(n, n)
        index = tensors["edge_index"].long()
        adjacency[index[0], index[1]] = tensors["edge_weight"]
    return Graph(
        prompt=meta["prompt"],
        input_tokens=meta["input_tokens"],
        model_id=meta["model_id"],
        transcoder_set=meta["transcoder_set"],
        n_layers=meta["n_layers"],
        logit_tokens=meta["logit_tokens"],
        config={**meta["config"], "saved_edges": meta.get("edges", {"kept": "all"})},  # a pruned save says so
        adjacency=adjacency,
        **{name: tensors[name] for name in _TENSORS},
    )


def saved_edges(directory: str | os.PathLike) -> dict:
    """Which edges a saved graph holds: ``{"kept": "all" | "pruned", "n_edges", thresholds}``."""
    meta = json.loads((Path(directory) / "graph.json").read_text())
    return meta.get("edges", {"kept": "all"})
