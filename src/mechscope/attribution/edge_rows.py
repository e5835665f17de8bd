"""The rows of the attribution edge matrix computed so far, stored without the columns they cannot use.

A row holds the direct effects of every source on one target. Its full column layout is
``[active features (sorted by layer, then position), error nodes (layer-major), token nodes]``
(``n_active + n_layers * n_pos + n_pos`` columns), as in circuit-tracer's ``edge_matrix``. A
feature target reads the MLP input of its layer ``l``, which only sources of layers ``< l`` can
reach; those features are a prefix of the active list, so a row keeps only its first ``width``
feature columns (``width`` = number of active features below the batch's highest target layer) and
the ``n_layers * n_pos + n_pos`` error and token columns. Logit rows keep every column.

On the default model this stores about a quarter of circuit-tracer's dense
``[max_feature_nodes + n_logits, n_active + ...]`` float32 matrix (measured: feature targets chosen
by influence sit mostly in early layers), and never builds an ``N x N`` matrix of all active
features. Influence on the logits, which orders the features to visit, is computed from the
same rows (see :meth:`EdgeRows.feature_influence`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from mechscope.memory import release_free_memory

__all__ = ["EdgeRows"]


@dataclass
class _Chunk:
    """Rows of one batch: ``nodes [k]`` (active-feature index, or ``-1`` for a logit row),
    ``features [k, width]`` edges from the first ``width`` active features, ``others [k, n_other]``
    edges from error and token nodes, ``row_sums [k]`` the rows' absolute sums over all columns."""

    nodes: torch.Tensor
    features: torch.Tensor
    others: torch.Tensor
    row_sums: torch.Tensor


class EdgeRows:
    """Edge rows in visit order: logit rows first, then feature rows as they are computed.

    Args:
        n_active: number of active features (feature columns of a full row).
        n_other: number of error plus token columns (``(n_layers + 1) * n_pos``).
    """

    def __init__(self, n_active: int, n_other: int):
        self.n_active, self.n_other = n_active, n_other
        self.chunks: list[_Chunk] = []
        self.n_rows = 0

    def add(
        self,
        nodes: Int[torch.Tensor, "k"],
        features: Float[torch.Tensor, "k width"],
        others: Float[torch.Tensor, "k n_other"],
    ) -> None:
        """Append rows. ``nodes[i]`` is the active-feature index of row ``i``'s target (``-1`` for
        a logit target); ``features`` holds its edges from active features ``0 .. width - 1`` (all
        later feature columns must be zero) and ``others`` from error and token nodes.

        Raises:
            ValueError: shapes that do not match the layout.
        """
        if features.shape[1] > self.n_active or others.shape[1] != self.n_other or len(features) != len(nodes):
            raise ValueError(f"rows of shape {tuple(features.shape)} + {tuple(others.shape)} for {len(nodes)} nodes "
                             f"do not fit {self.n_active} feature and {self.n_other} other columns")
        row_sums = features.abs().sum(1) + others.abs().sum(1)
        self.chunks.append(_Chunk(nodes.long(), features, others, row_sums))
        self.n_rows += len(nodes)

    def nbytes(self) -> int:
        """Bytes held by the stored rows."""
        return sum(c.features.nbytes + c.others.nbytes for c in self.chunks)

    def feature_influence(self, logit_probabilities: Float[torch.Tensor, "n_logits"], max_iter: int = 128
                          ) -> Float[torch.Tensor, "n_active"]:
        """Influence on the logits of every active feature, through the rows computed so far.

        The same quantity as circuit-tracer's ``compute_partial_influences`` (and
        :func:`mechscope.graph.prune.partial_influences`): with ``Â`` the rows normalised to unit
        absolute sum, ``x_0 = p`` on the logit rows, ``x_{k+1} = x_k Â`` restricted to nodes that
        have a row, influence ``= sum_{k>=1} x_k``. Only row nodes carry ``x`` past the first step,
        so the series is first summed on the small ``[rows, rows]`` block ``V = sum_k v_k`` and
        then spread to every column with one product ``V Â`` — one pass over the stored rows instead
        of one per path length.

        Raises:
            RuntimeError: the series has not terminated after ``max_iter`` terms (a cycle).
        """
        nodes = torch.cat([c.nodes for c in self.chunks])
        n_rows = len(nodes)
        row_of = torch.full((self.n_active,), -1, dtype=torch.long)  # active feature -> its row
        is_feature = nodes >= 0
        row_of[nodes[is_feature]] = torch.arange(n_rows)[is_feature]
        visited = nodes[is_feature].sort().values
        block = torch.zeros(n_rows, n_rows)  # normalised |A| restricted to row-node sources
        start = 0
        for chunk in self.chunks:
            cols = visited[: int(torch.searchsorted(visited, chunk.features.shape[1]))]
            k = len(chunk.nodes)
            block[start : start + k, row_of[cols]] = chunk.features[:, cols].abs() / chunk.row_sums.clamp(min=1e-10)[:, None]
            start += k
        n_logits = len(logit_probabilities)
        x = torch.zeros(n_rows)
        x[:n_logits] = logit_probabilities.float()
        total = x.clone()
        for _ in range(max_iter):
            x = x @ block
            if not x.any():
                break
            total += x
        else:
            raise RuntimeError(f"partial influence did not converge in {max_iter} iterations")
        influence = torch.zeros(self.n_active)
        start = 0
        for chunk in self.chunks:
            k, width = chunk.features.shape
            weights = total[start : start + k] / chunk.row_sums.clamp(min=1e-10)
            influence[:width] += weights @ chunk.features.abs()
            start += k
        return influence

    def assemble(self, selected: Int[torch.Tensor, "n_selected"], n_logits: int) -> Float[torch.Tensor, "n_nodes n_nodes"]:
        """The graph's adjacency over ``[selected features, errors, tokens, logits]``.

        Consumes the stored rows: each chunk is freed (and its pages returned to the kernel) once
        copied, and each adjacency row is first touched when it is written, so the resident peak is
        about the stored rows, not the stored rows plus the adjacency.

        Args:
            selected: ``[n_selected]`` ascending active-feature indices of the visited features.
            n_logits: number of logit rows (stored first).
        """
        n_selected = len(selected)
        n_nodes = n_selected + self.n_other + n_logits
        adjacency = torch.empty(n_nodes, n_nodes)  # pages become resident as rows are written
        adjacency[n_selected : n_selected + self.n_other] = 0  # error and token nodes have no inputs
        logit_row = n_nodes - n_logits
        while self.chunks:
            chunk = self.chunks.pop(0)
            is_logit = chunk.nodes < 0
            rows = torch.searchsorted(selected, chunk.nodes)
            rows[is_logit] = logit_row + torch.arange(int(is_logit.sum()))
            logit_row += int(is_logit.sum())
            n_cols = int(torch.searchsorted(selected, chunk.features.shape[1]))
            block = torch.zeros(len(rows), n_nodes)
            block[:, :n_cols] = chunk.features[:, selected[:n_cols]]
            block[:, n_selected : n_selected + self.n_other] = chunk.others
            del chunk
            adjacency[rows] = block
            del block
            release_free_memory()
        self.n_rows = 0
        return adjacency
