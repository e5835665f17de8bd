"""The rows of the attribution edge matrix computed so far, stored without the columns they cannot use.

A row holds the direct effects of every source on one target. Its full column layout is
``[active features (sorted by layer, then position), error nodes (layer-major), token nodes]``
(``n_active + n_layers * n_pos + n_pos`` columns), as in circuit-tracer's ``edge_matrix``. Two
kinds of column are zero in a feature target's row and are not stored:

- a target reads the MLP input of its layer ``l``, which only sources of layers ``< l`` reach;
- attention is causal, so a target at position ``p`` gets nothing from sources at positions ``> p``.

Rows are stored in chunks; a chunk has a *span* ``(n_source_layers, n_positions)``: its rows keep
the columns of active features in layers ``< n_source_layers`` at positions ``< n_positions`` (per
layer a contiguous run of the active list, since it is sorted by position within a layer; the
runs concatenated in layer order), and the error and token columns of positions ``< n_positions``.
Logit rows span every column. Chunks are small groups of targets planned to share a tight span
(see :func:`mechscope.attribution.attribute.plan_groups`), so a stored row holds about the columns
its own target can reach, not those of its batch's highest and latest target; the dense
``[rows, all active features]`` matrix of circuit-tracer is never built, nor an ``N x N`` matrix of
all active features. Influence on the logits, which orders the features to visit, is computed from
the same rows (see :meth:`EdgeRows.feature_influence`).

Rows are float32. When they outgrow a memory budget (a long prompt: at 2,047 tokens the 8,192
visited rows reach about two million columns each), every stored and later row's feature columns
go to float16 scaled per row by a power of two (its largest magnitude maps into ``(2^13, 2^14]``):
half the memory, each edge rounded to 11 significant bits (error at most 2^-11 of itself; edges
below 2^-27 of their row's largest fall among float16's subnormals, error at most 2^-38 of that
largest), row sums kept exact. Only graphs that would not fit otherwise are affected, and the
graph records it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from mechscope.memory import release_free_memory

logger = logging.getLogger(__name__)

__all__ = ["ActiveLayout", "EdgeRows"]


class ActiveLayout:
    """Where each active feature sits in the active list (sorted by layer, then position).

    Args:
        layers: ``[n_active]`` layer of each active feature (non-decreasing).
        positions: ``[n_active]`` its position (non-decreasing within a layer).
        n_layers, n_pos: the model's layers and the prompt's positions.

    Attributes:
        starts: ``[n_layers + 1]`` first active index of each layer (and ``n_active``).
        below: ``[n_layers, n_pos + 1]`` number of a layer's active features at positions ``< n``.

    Raises:
        ValueError: features not sorted by layer then position.
    """

    def __init__(self, layers: Int[torch.Tensor, "n_active"], positions: Int[torch.Tensor, "n_active"],
                 n_layers: int, n_pos: int):
        layers, positions = layers.long().cpu().contiguous(), positions.long().cpu().contiguous()
        key = layers * (n_pos + 1) + positions
        if len(key) > 1 and bool((key[1:] < key[:-1]).any()):
            raise ValueError("active features must be sorted by layer, then position")
        self.layers, self.positions = layers, positions
        self.n_active, self.n_layers, self.n_pos = len(layers), n_layers, n_pos
        self.starts = torch.searchsorted(layers, torch.arange(n_layers + 1))
        counts = torch.zeros(n_layers, n_pos + 1, dtype=torch.long)
        counts.view(-1).index_add_(0, layers * (n_pos + 1) + positions + 1, torch.ones_like(layers))
        self.below = counts.cumsum(1)
        self._offsets: dict[tuple[int, int], torch.Tensor] = {}

    def offsets(self, n_source_layers: int, n_positions: int) -> torch.Tensor:
        """``[n_source_layers + 1]`` where each layer's run starts in a row of this span (and its width)."""
        key = (n_source_layers, n_positions)
        if key not in self._offsets:
            widths = self.below[:n_source_layers, n_positions]
            self._offsets[key] = torch.cat([torch.zeros(1, dtype=torch.long), widths.cumsum(0)])
        return self._offsets[key]

    def width(self, n_source_layers: int, n_positions: int) -> int:
        """Number of feature columns a row of this span stores."""
        return int(self.below[:n_source_layers, n_positions].sum())

    def locate(self, idx: Int[torch.Tensor, "m"], n_source_layers: int, n_positions: int,
               where: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inside [m] bool, local [m])``: whether active features ``idx`` are columns of this
        span, and for those that are, their column in its rows. ``where``: their ``(layers,
        positions)``, when already looked up."""
        layer, pos = (self.layers[idx], self.positions[idx]) if where is None else where
        inside = (layer < n_source_layers) & (pos < n_positions)
        offsets = self.offsets(n_source_layers, n_positions)
        layer_in = layer.clamp(max=max(n_source_layers - 1, 0))
        local = offsets[layer_in] + idx - self.starts[layer_in]
        return inside, torch.where(inside, local, torch.zeros_like(local))

    def scatter_add(self, target: Float[torch.Tensor, "n_active"], values: Float[torch.Tensor, "width"],
                    n_source_layers: int, n_positions: int) -> None:
        """``target[columns of the span] += values`` (one slice per layer)."""
        offsets = self.offsets(n_source_layers, n_positions).tolist()
        for layer in range(n_source_layers):
            a, b = offsets[layer], offsets[layer + 1]
            if b > a:
                start = int(self.starts[layer])
                target[start : start + b - a] += values[a:b]


@dataclass
class _Chunk:
    """Rows of one group of targets: ``nodes [k]`` (active-feature index, or ``-1`` for a logit
    row), ``features [k, width]`` edges from the active features of the chunk's span, ``others [k,
    n_layers + 1, n_positions]`` edges from error nodes (per layer) and token nodes (last) at the
    span's positions, ``row_sums [k]`` the rows' absolute sums, ``span`` ``(n_source_layers, n_positions)``.
    A compact chunk holds ``features`` in float16 and ``scale [k]``: the edges are ``features * scale``."""

    nodes: torch.Tensor
    features: torch.Tensor
    others: torch.Tensor
    row_sums: torch.Tensor
    span: tuple[int, int]
    scale: torch.Tensor | None = None

    def compress(self) -> None:
        """Feature columns to float16, each row scaled by a power of two (exact) so its largest
        magnitude lies in ``(2^13, 2^14]``, well inside float16's range (max 65,504). A chunk with
        a non-finite edge stays float32 (a scale cannot represent it)."""
        if self.scale is not None or self.features.numel() == 0 or not bool(self.features.isfinite().all()):
            return
        peak = self.features.abs().amax(1).clamp(min=1e-30)
        self.scale = torch.exp2(torch.ceil(torch.log2(peak)) - 14)
        self.features = (self.features / self.scale[:, None]).half()

    def feature_values(self, columns: torch.Tensor | None = None) -> Float[torch.Tensor, "k m"]:
        """The feature edges (of the local ``columns``, or all) in float32."""
        values = self.features if columns is None else self.features[:, columns]
        return values if self.scale is None else values.float() * self.scale[:, None]

    def weighted_abs_sum(self, weights: Float[torch.Tensor, "k"]) -> Float[torch.Tensor, "width"]:
        """``weights @ |features|`` (float32; a compact chunk in blocks of 16 rows, so at most 16
        rows are float32 at once)."""
        if self.scale is None:
            return weights @ self.features.abs()
        weights = weights * self.scale
        total = torch.zeros(self.features.shape[1])
        for start in range(0, len(weights), 16):
            total += weights[start : start + 16] @ self.features[start : start + 16].float().abs_()
        return total


class EdgeRows:
    """Edge rows in visit order: logit rows first, then feature rows as they are computed.

    Args:
        layout: the active features' layers and positions (:class:`ActiveLayout`).
        budget_bytes: when the stored rows exceed this, they and every later row are held compact
            (float16 feature columns, see the module docstring); ``None``: always float32.

    Attributes:
        compact: whether the rows are held compact.
    """

    def __init__(self, layout: ActiveLayout, budget_bytes: float | None = None):
        self.layout = layout
        self.n_active = layout.n_active
        self.n_other = (layout.n_layers + 1) * layout.n_pos  # error then token columns of a full row
        self.chunks: list[_Chunk] = []
        self.n_rows = 0
        self.budget_bytes = budget_bytes
        self.compact = False

    def add(
        self,
        nodes: Int[torch.Tensor, "k"],
        features: Float[torch.Tensor, "k width"],
        others: Float[torch.Tensor, "k n_layers_plus_1 n_positions"],
        span: tuple[int, int] | None = None,
    ) -> None:
        """Append rows. ``nodes[i]`` is the active-feature index of row ``i``'s target (``-1`` for
        a logit target); ``features`` holds its edges from the active features of ``span``
        ``(n_source_layers, n_positions)`` (default: every column) in the layout's order, ``others``
        from error and token nodes at positions ``< n_positions``. Every column outside the span
        must be zero in the full row.

        Raises:
            ValueError: shapes that do not match the span.
        """
        layout = self.layout
        span = (layout.n_layers, layout.n_pos) if span is None else (int(span[0]), int(span[1]))
        width = layout.width(*span)
        if (features.shape != (len(nodes), width) or others.shape != (len(nodes), layout.n_layers + 1, span[1])):
            raise ValueError(f"rows of shape {tuple(features.shape)} + {tuple(others.shape)} for {len(nodes)} nodes "
                             f"do not fit span {span} ({width} feature columns, "
                             f"others [{len(nodes)}, {layout.n_layers + 1}, {span[1]}])")
        row_sums = features.abs().sum(1) + others.abs().sum((1, 2))
        chunk = _Chunk(nodes.long(), features, others, row_sums, span)
        self.chunks.append(chunk)
        self.n_rows += len(nodes)
        if self.compact:
            chunk.compress()
        elif self.budget_bytes is not None and self.nbytes() > self.budget_bytes:
            logger.warning("the edge rows passed %.1f GB after %d rows: holding them in float16 from now on "
                           "(each edge rounded to 11 significant bits; more memory keeps them float32)",
                           self.budget_bytes / 1e9, self.n_rows)
            self.compact = True
            for stored in self.chunks:
                stored.compress()
            release_free_memory()

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
        where = (self.layout.layers[visited], self.layout.positions[visited])
        start = 0
        for chunk in self.chunks:
            inside, local = self.layout.locate(visited, *chunk.span, where=where)
            k = len(chunk.nodes)
            block[start : start + k, row_of[visited[inside]]] = (
                chunk.feature_values(local[inside]).abs() / chunk.row_sums.clamp(min=1e-10)[:, None])
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
            k = len(chunk.nodes)
            weights = total[start : start + k] / chunk.row_sums.clamp(min=1e-10)
            self.layout.scatter_add(influence, chunk.weighted_abs_sum(weights), *chunk.span)
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
        layout = self.layout
        n_selected = len(selected)
        n_nodes = n_selected + self.n_other + n_logits
        # calloc (numpy's zeros) maps fresh zero pages for a block this large: a page becomes
        # resident when a row on it is written, so the rows of error and token nodes (no inputs;
        # 80 % of the matrix at 2,048 tokens) stay zero without taking memory
        adjacency = torch.from_numpy(np.zeros((n_nodes, n_nodes), dtype=np.float32))
        logit_row = n_nodes - n_logits
        where = (layout.layers[selected], layout.positions[selected])
        freed = 0
        while self.chunks:
            chunk = self.chunks.pop(0)
            is_logit = chunk.nodes < 0
            rows = torch.searchsorted(selected, chunk.nodes)
            rows[is_logit] = logit_row + torch.arange(int(is_logit.sum()))
            logit_row += int(is_logit.sum())
            inside, local = layout.locate(selected, *chunk.span, where=where)
            block = torch.zeros(len(rows), n_nodes)
            block[:, :n_selected][:, inside] = chunk.feature_values(local[inside])
            others = block[:, n_selected : n_selected + self.n_other].view(len(rows), layout.n_layers + 1, layout.n_pos)
            others[:, :, : chunk.span[1]] = chunk.others
            freed += chunk.features.nbytes + chunk.others.nbytes
            del chunk
            adjacency[rows] = block
            del block
            if freed > 2**26 or not self.chunks:  # trimming the heap costs milliseconds: every 64 MB freed
                release_free_memory()
                freed = 0
        self.n_rows = 0
        return adjacency
