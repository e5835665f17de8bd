"""Influence, pruning and graph scores (Ameisen et al. 2025, "Circuit Tracing", section 5.2 and
appendix "Graph pruning"; the same definitions as circuit-tracer's ``graph.py``).

- Normalised adjacency: ``|A|`` with each row scaled to sum to 1.
- Indirect influence on the logits: ``w^T (A + A^2 + ...) = w^T ((I - A)^-1 - I)`` with ``w`` the
  logit probabilities, computed by iterating ``x <- x A`` (the graph is a DAG, so it terminates).
- Node pruning keeps the most influential nodes up to ``node_threshold`` of the total influence
  (tokens and logits always kept); edge pruning keeps edges up to ``edge_threshold`` of total edge
  influence; then feature and error nodes left without outgoing edges (and features without
  incoming edges) are dropped until nothing changes.
- Replacement score: of the influence reaching the logits from tokens and errors, the token share.
- Completeness score: the influence-weighted share of each node's input that comes from non-error
  nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float

from mechscope.errors import BadInputError
from mechscope.graph.graph import Graph

__all__ = [
    "normalize_matrix",
    "compute_influence",
    "partial_influences",
    "logit_influence",
    "prune_graph",
    "PruneResult",
    "graph_scores",
]


def normalize_matrix(matrix: Float[torch.Tensor, "n_targets n_sources"]) -> torch.Tensor:
    """``|A|`` with rows summing to 1 (all-zero rows stay zero); one new matrix, normalised in place."""
    return _normalize_rows_(matrix.abs())


def _normalize_rows_(absolute: torch.Tensor) -> torch.Tensor:
    """Divide non-negative rows by their sums in place (all-zero rows stay zero)."""
    return absolute.div_(absolute.sum(dim=1, keepdim=True).clamp(min=1e-10))


def compute_influence(
    A: Float[torch.Tensor, "n_nodes n_nodes"], weights: Float[torch.Tensor, "n_nodes"], max_iter: int = 1000
) -> Float[torch.Tensor, "n_nodes"]:
    """``weights @ (A + A^2 + ...)`` for a nilpotent (acyclic) ``A``.

    Raises:
        RuntimeError: if the series has not terminated after ``max_iter`` terms (a cycle).
    """
    current = weights @ A
    influence = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ A
        influence += current
    raise RuntimeError(f"influence did not converge in {max_iter} iterations; is the graph acyclic?")


def logit_influence(graph: Graph, logit: int) -> Float[torch.Tensor, "n_nodes"]:
    """Direct plus indirect influence of every node on one logit target (``logit`` indexes the
    graph's logit targets): row ``logit`` of ``(A + A^2 + ...)`` on the normalised adjacency. Finds
    the features behind one answer (which nodes to group, suppress or inject).

    Raises:
        BadInputError: ``logit`` is not a logit target index.
    """
    if not 0 <= logit < graph.n_logits:
        raise BadInputError(f"logit index {logit} out of range; the graph has {graph.n_logits} logit targets")
    weights = torch.zeros(graph.n_nodes)
    weights[graph.logit_offset + logit] = 1.0
    return compute_influence(normalize_matrix(graph.adjacency.float()), weights)


def partial_influences(
    edge_rows: Float[torch.Tensor, "n_rows n_cols"],
    logit_probabilities: Float[torch.Tensor, "n_logits"],
    row_to_node: torch.Tensor,
    max_iter: int = 128,
) -> Float[torch.Tensor, "n_cols"]:
    """Influence on the logits of every column node, from the rows computed so far.

    ``edge_rows[r]`` holds the incoming edges of node ``row_to_node[r]`` (a column index); the logit
    rows come first. Used to choose which features to visit next during attribution.
    """
    normalized = normalize_matrix(edge_rows)
    influence = torch.zeros(edge_rows.shape[1])
    prod = torch.zeros(edge_rows.shape[1] + len(logit_probabilities))
    n_cols = edge_rows.shape[1]
    prod[n_cols:] = logit_probabilities
    # logit rows map to slots past the source columns, where the probabilities sit
    for _ in range(max_iter):
        x = prod[row_to_node] @ normalized
        if not x.any():
            return influence
        influence += x
        prod = torch.cat([x, torch.zeros(len(logit_probabilities))])
    raise RuntimeError(f"partial influence did not converge in {max_iter} iterations")


def _find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest score among the highest scores that together hold ``threshold`` of the total
    (non-negative ``scores``). Sorts only the positive scores and keeps no index tensor, so an
    ``N x N`` edge-score matrix costs about three float32 copies of its non-zero part."""
    positive = scores[scores > 0]
    if positive.numel() == 0:
        return torch.tensor(0.0)
    ascending = np.sort(positive.numpy())
    del positive
    descending = torch.from_numpy(np.ascontiguousarray(ascending[::-1]))
    del ascending
    cumulative = descending.cumsum(0).div_(descending.sum().clamp(min=1e-30))
    index = int(torch.searchsorted(cumulative, torch.tensor(threshold)))
    if index < len(descending):
        return descending[index]
    # the threshold lies past the last positive score (rounding, or threshold 1): keep everything
    return torch.tensor(0.0) if descending.numel() < scores.numel() else descending[-1]


@dataclass
class PruneResult:
    """Which nodes and edges survive pruning.

    Attributes:
        node_mask: ``[n_nodes]`` kept nodes.
        edge_mask: ``[n_nodes, n_nodes]`` kept edges (target row, source column).
        cumulative_scores: ``[n_nodes]`` each node's cumulative share of influence when nodes are
            sorted by influence (the "node influence" slider of the graph UI).
    """

    node_mask: Bool[torch.Tensor, "n_nodes"]
    edge_mask: Bool[torch.Tensor, "n_nodes n_nodes"]
    cumulative_scores: Float[torch.Tensor, "n_nodes"]


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Prune by influence on the logits.

    Raises:
        BadInputError: a threshold outside [0, 1].
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise BadInputError(f"{name} must be between 0 and 1, got {value}")
    A = graph.adjacency.float()
    weights = graph.logit_weights()
    n_features, keep_from = graph.n_features, graph.token_offset
    node_influence = compute_influence(normalize_matrix(A), weights)
    node_mask = node_influence >= _find_threshold(node_influence, node_threshold)
    node_mask[keep_from:] = True  # tokens and logits
    normalized = A.abs()  # |A| of the kept nodes, normalised in place: one N x N copy
    normalized[~node_mask] = 0
    normalized[:, ~node_mask] = 0
    _normalize_rows_(normalized)
    edge_scores = normalized.mul_((compute_influence(normalized, weights) + weights)[:, None])  # in place
    del normalized
    edge_mask = edge_scores >= _find_threshold(edge_scores, edge_threshold)
    del edge_scores
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:keep_from] &= edge_mask[:, :keep_from].any(0)  # features/errors need an out-edge
        node_mask[:n_features] &= edge_mask[:n_features].any(1)  # features need an in-edge
        if torch.equal(node_mask, before):
            break
    order = node_influence.argsort(descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = node_influence[order].cumsum(0) / node_influence.sum().clamp(min=1e-30)
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """``(replacement_score, completeness_score)`` of an unpruned graph, each in [0, 1]."""
    normalized = normalize_matrix(graph.adjacency.float())
    weights = graph.logit_weights()
    influence = compute_influence(normalized, weights)
    errors = slice(graph.error_offset, graph.token_offset)
    tokens = slice(graph.token_offset, graph.logit_offset)
    token_influence, error_influence = influence[tokens].sum(), influence[errors].sum()
    replacement = token_influence / (token_influence + error_influence).clamp(min=1e-30)
    non_error = 1 - normalized[:, errors].sum(-1)
    output_influence = influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(replacement), float(completeness)
