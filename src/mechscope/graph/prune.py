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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int

from mechscope.errors import BadInputError
from mechscope.graph.graph import Graph
from mechscope.memory import release_free_memory

__all__ = [
    "normalize_matrix",
    "compute_influence",
    "partial_influences",
    "logit_influence",
    "node_influence",
    "prune_graph",
    "PruneResult",
    "kept_edges",
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


def node_influence(graph: Graph, weights: Float[torch.Tensor, "n_nodes"] | None = None) -> Float[torch.Tensor, "n_nodes"]:
    """Direct plus indirect influence of every node on the logit targets, as pruning ranks nodes:
    ``weights @ (A + A^2 + ...)`` on the row-normalised ``|A|`` ("Circuit Tracing", appendix "Graph
    pruning"), unitless; computed on row blocks of the adjacency, without a normalised ``N x N`` copy.

    Args:
        weights: ``[n_nodes]`` weight of each logit node (default: the targets' probabilities,
            :meth:`Graph.logit_weights`).
    """
    A = graph.adjacency.float()
    weights = graph.logit_weights() if weights is None else weights
    return _normalized_influence(A, weights, _inverse(_abs_row_sums(A)))


def logit_influence(graph: Graph, logit: int) -> Float[torch.Tensor, "n_nodes"]:
    """Direct plus indirect influence of every node on one logit target (``logit`` indexes the
    graph's logit targets): row ``logit`` of ``(A + A^2 + ...)`` on the normalised adjacency
    (:func:`node_influence` with that target alone). Finds the features behind one answer (which
    nodes to group, suppress or inject).

    Raises:
        BadInputError: ``logit`` is not a logit target index.
    """
    if not 0 <= logit < graph.n_logits:
        raise BadInputError(f"logit index {logit} out of range; the graph has {graph.n_logits} logit targets")
    weights = torch.zeros(graph.n_nodes)
    weights[graph.logit_offset + logit] = 1.0
    return node_influence(graph, weights)


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


_BLOCK_ROWS = 1024  # rows of |A| materialised at a time by the blocked products below


def _row_blocks(n_rows: int) -> list[slice]:
    """Consecutive slices of at most ``_BLOCK_ROWS`` rows covering ``n_rows``."""
    return [slice(start, min(start + _BLOCK_ROWS, n_rows)) for start in range(0, n_rows, _BLOCK_ROWS)]


def _abs_blocks(A: torch.Tensor):
    """``(rows, |A[rows]|)`` for consecutive blocks of rows: at most ``_BLOCK_ROWS x N`` extra floats."""
    for rows in _row_blocks(A.shape[0]):
        yield rows, A[rows].abs()


def _abs_row_sums(A: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``|A| @ columns`` (row sums of ``|A|``, over the columns where ``columns`` is 1)."""
    sums = torch.zeros(A.shape[0])
    for rows, block in _abs_blocks(A):
        sums[rows] = block.sum(1) if columns is None else block @ columns
    return sums


def _normalized_influence(A: torch.Tensor, weights: torch.Tensor, row_scale: torch.Tensor,
                          columns: torch.Tensor | None = None, max_iter: int = 1000) -> torch.Tensor:
    """:func:`compute_influence` on ``diag(row_scale) |A| diag(columns)`` without building it: each
    term ``x <- ((x * row_scale) @ |A|) * columns`` visits only the row blocks where ``x`` is
    non-zero. ``row_scale`` is ``1 / row sum`` (0 for dropped rows), ``columns`` 0/1 (kept columns).

    Raises:
        RuntimeError: if the series has not terminated after ``max_iter`` terms (a cycle).
    """
    current, influence = weights.float(), torch.zeros(A.shape[0])
    for _ in range(max_iter):
        scaled = current * row_scale
        current = torch.zeros(A.shape[1])
        for rows in _row_blocks(A.shape[0]):
            if scaled[rows].any():  # a DAG's terms are non-zero on fewer rows at each step
                current += scaled[rows] @ A[rows].abs()
        if columns is not None:
            current *= columns
        if not current.any():
            return influence
        influence += current
    raise RuntimeError(f"influence did not converge in {max_iter} iterations; is the graph acyclic?")


def _inverse(sums: torch.Tensor) -> torch.Tensor:
    """``1 / sums`` with the same floor as :func:`normalize_matrix` (all-zero rows stay zero)."""
    return 1.0 / sums.clamp(min=1e-10)


def _find_threshold(scores: Iterable[torch.Tensor], threshold: float, n_scores: int) -> torch.Tensor:
    """The smallest score among the highest scores that together hold ``threshold`` of the total
    (threshold 1: the smallest positive score, so that every positive score is kept).

    Args:
        scores: the non-negative scores, in pieces (row blocks of an edge-score matrix); only their
            positive entries are kept, sorted in place: at most two float32 copies of them live.
        n_scores: how many scores there are in all.
    """
    positive = torch.cat([piece[piece > 0] for piece in scores])
    if positive.numel() == 0:
        return torch.tensor(0.0)
    positive.numpy().sort()  # ascending, in place
    if threshold >= 1.0:  # every positive score: the cumulative share can reach 1 a rounding early
        return positive[0].clone()
    descending = positive.flip(0)
    del positive
    cumulative = descending.cumsum(0).div_(descending.sum().clamp(min=1e-30))
    index = int(torch.searchsorted(cumulative, torch.tensor(threshold)))
    if index < len(descending):
        return descending[index].clone()
    # the threshold lies past the last positive score (rounding): keep everything
    return torch.tensor(0.0) if descending.numel() < n_scores else descending[-1].clone()


@dataclass
class PruneResult:
    """Which nodes and edges survive pruning.

    Edges survive only between *candidates*, the nodes the node threshold keeps (plus tokens and
    logits), so the edge mask is held over them: ``[k, k]`` instead of ``[n_nodes, n_nodes]`` (with
    every active feature of a 29-token prompt, 4.6k candidates of 23.8k nodes: 21 MB instead of
    567 MB). :attr:`edge_mask` builds the full mask; :meth:`edge_mask_rows` a block of its rows.

    Attributes:
        node_mask: ``[n_nodes]`` kept nodes.
        candidates: ``[k]`` ascending indices of the nodes the node threshold kept (a superset of
            ``node_mask``: a candidate without a surviving edge is dropped).
        candidate_edges: ``[k, k]`` kept edges among the candidates (target row, source column).
        cumulative_scores: ``[n_nodes]`` each node's cumulative share of influence when nodes are
            sorted by influence (the "node influence" slider of the graph UI).
    """

    node_mask: Bool[torch.Tensor, "n_nodes"]
    candidates: Int[torch.Tensor, "k"]
    candidate_edges: Bool[torch.Tensor, "k k"]
    cumulative_scores: Float[torch.Tensor, "n_nodes"]

    @property
    def edge_mask(self) -> Bool[torch.Tensor, "n_nodes n_nodes"]:
        """``[n_nodes, n_nodes]`` kept edges (target row, source column); allocates the whole mask."""
        return self.edge_mask_rows(0, len(self.node_mask))

    def edge_mask_rows(self, start: int, stop: int) -> Bool[torch.Tensor, "rows n_nodes"]:
        """Rows ``start:stop`` of :attr:`edge_mask`, ``[stop - start, n_nodes]``."""
        n = len(self.node_mask)
        stop = min(stop, n)
        block = torch.zeros(max(stop - start, 0), n, dtype=torch.bool)
        inside = (self.candidates >= start) & (self.candidates < stop)
        block[(self.candidates[inside] - start)[:, None], self.candidates[None, :]] = self.candidate_edges[inside]
        return block


def kept_edges(adjacency: Float[torch.Tensor, "n_nodes n_nodes"], pruned: PruneResult | None = None,
               block_rows: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The non-zero edges of ``adjacency`` that ``pruned`` keeps (every non-zero edge when ``None``).

    Yields ``(targets [m] int64, sources [m] int64, weights [m])`` blocks in row-major order (target
    ascending, then source), each from at most ``block_rows`` rows, so no ``N x N`` mask or index
    tensor is made. With ``pruned`` only the candidates' rows and columns are read
    (:class:`PruneResult`), ``[block_rows, k]`` at a time; every edge it yields joins two nodes of
    ``pruned.node_mask`` (pruning clears the edges of the candidates it drops).
    """
    n = adjacency.shape[0]
    if pruned is None:
        for start in range(0, n, block_rows):
            block = adjacency[start : start + block_rows]
            rows, cols = (block != 0).nonzero(as_tuple=True)
            yield rows + start, cols, block[rows, cols]
        return
    candidates = pruned.candidates.long()
    for start in range(0, len(candidates), block_rows):
        block_targets = candidates[start : start + block_rows]
        block = adjacency[block_targets[:, None], candidates[None, :]]  # [rows, k], never [rows, N]
        rows, cols = ((block != 0) & pruned.candidate_edges[start : start + block_rows]).nonzero(as_tuple=True)
        yield block_targets[rows], candidates[cols], block[rows, cols]


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Prune by influence on the logits.

    Works on row blocks of ``|A|`` (see :func:`_normalized_influence`): besides the adjacency it
    holds the edge mask among the nodes the node threshold keeps (see :class:`PruneResult`) and two
    float32 copies of the positive edge scores (to sort them), never a normalised ``N x N`` copy.

    Raises:
        BadInputError: a threshold outside [0, 1].
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise BadInputError(f"{name} must be between 0 and 1, got {value}")
    A = graph.adjacency.float()
    weights = graph.logit_weights()
    n_features, keep_from = graph.n_features, graph.token_offset
    influence = node_influence(graph, weights)
    node_mask = influence >= _find_threshold([influence], node_threshold, len(influence))
    node_mask[keep_from:] = True  # tokens and logits
    # edge score [t, s] = |A[t, s]| / (row sum of t over kept s) * (influence of t + its logit weight),
    # on kept nodes only: |A[t, s]| * kept[s] * edge_weight[t]
    kept = node_mask.float()
    row_scale = _inverse(_abs_row_sums(A, kept)) * kept
    edge_weight = (_normalized_influence(A, weights, row_scale, kept) + weights) * row_scale
    candidates = node_mask.nonzero().flatten()

    def edge_scores():  # [rows, candidates]: an edge from or to a non-candidate scores 0 and is dropped below
        for rows, block in _abs_blocks(A):
            yield rows, block[:, candidates].mul_(edge_weight[rows, None])

    # the zero scores of the other columns count towards A.numel(): a threshold the positive scores fall
    # short of by rounding then keeps them all
    cutoff = _find_threshold((block for _, block in edge_scores()), edge_threshold, A.numel())
    position = torch.full((len(node_mask),), -1, dtype=torch.long)
    position[candidates] = torch.arange(len(candidates))
    edges = torch.zeros(len(candidates), len(candidates), dtype=torch.bool)
    for rows, block in edge_scores():
        local = position[rows]
        inside = local >= 0
        edges[local[inside]] = block[inside] >= cutoff
    mask = node_mask[candidates]  # candidates still kept
    n_feat_c = int((candidates < n_features).sum())
    keep_from_c = int((candidates < keep_from).sum())
    while True:
        before = mask.clone()
        edges[~mask] = False
        edges[:, ~mask] = False
        mask[:keep_from_c] &= edges[:, :keep_from_c].any(0)  # features/errors need an out-edge
        mask[:n_feat_c] &= edges[:n_feat_c].any(1)  # features need an in-edge
        if torch.equal(mask, before):
            break
    node_mask = torch.zeros_like(node_mask)
    node_mask[candidates] = mask
    order = influence.argsort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = influence[order].cumsum(0) / influence.sum().clamp(min=1e-30)
    release_free_memory()  # the row blocks and sorted scores, freed but still resident in the heap
    return PruneResult(node_mask, candidates, edges, cumulative)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """``(replacement_score, completeness_score)`` of an unpruned graph, each in [0, 1]."""
    A = graph.adjacency.float()
    weights = graph.logit_weights()
    row_scale = _inverse(_abs_row_sums(A))
    influence = _normalized_influence(A, weights, row_scale)
    errors = slice(graph.error_offset, graph.token_offset)
    tokens = slice(graph.token_offset, graph.logit_offset)
    token_influence, error_influence = influence[tokens].sum(), influence[errors].sum()
    replacement = token_influence / (token_influence + error_influence).clamp(min=1e-30)
    error_columns = torch.zeros(graph.n_nodes)
    error_columns[errors] = 1.0
    non_error = 1 - _abs_row_sums(A, error_columns) * row_scale
    output_influence = influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(replacement), float(completeness)
