"""Compact edge-row storage equals the dense edge matrix of circuit-tracer's algorithm."""

from __future__ import annotations

import pytest
import torch

from mechscope.attribution.edge_rows import ActiveLayout, EdgeRows
from mechscope.graph.prune import partial_influences


def _random_rows(n_layers=4, n_pos=6, n_logits=3, spans=((5, (0, 3)), (7, (2, 6)), (4, (4, 2)), (6, (1, 6)), (3, (4, 6))),
                 seed=0, budget_bytes=None):
    """Dense rows (logits first, then feature rows with zeros outside each chunk's span of layers
    and positions) and the same rows in an EdgeRows."""
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(n_layers, n_pos, generator=gen) < 0.7  # which (layer, pos) cells have a feature
    per_cell = torch.randint(1, 4, (n_layers, n_pos), generator=gen) * active
    layers = torch.repeat_interleave(torch.arange(n_layers).repeat_interleave(n_pos), per_cell.flatten())
    positions = torch.repeat_interleave(torch.arange(n_pos).repeat(n_layers), per_cell.flatten())
    layout = ActiveLayout(layers, positions, n_layers, n_pos)
    n_active, n_other = len(layers), (n_layers + 1) * n_pos
    rows = EdgeRows(layout, budget_bytes)
    logit = torch.randn(n_logits, n_active + n_other, generator=gen)
    rows.add(torch.full((n_logits,), -1), logit[:, :n_active], logit[:, n_active:].view(n_logits, n_layers + 1, n_pos))
    dense, nodes = [logit], [torch.arange(n_logits) + n_active + n_other]
    order = torch.randperm(n_active, generator=gen)
    used = 0
    for k, (n_source_layers, n) in spans:
        idx = order[used : used + k]
        used += k
        block = torch.randn(k, n_active + n_other, generator=gen)
        block[:, :n_active][:, (layers >= n_source_layers) | (positions >= n)] = 0
        others = block[:, n_active:].view(k, n_layers + 1, n_pos)
        others[:, :, n:] = 0
        in_span = (layers < n_source_layers) & (positions < n)  # in ascending order = the layout's order
        rows.add(idx, block[:, :n_active][:, in_span], others[:, :, :n].clone(), (n_source_layers, n))
        dense.append(block)
        nodes.append(idx)
    return rows, torch.cat(dense), torch.cat(nodes)


def test_active_layout_spans_are_the_reachable_columns():
    rows, dense, _ = _random_rows()
    layout = rows.layout
    for n_source_layers, n in ((0, 6), (2, 3), (4, 6), (3, 0)):
        columns = ((layout.layers < n_source_layers) & (layout.positions < n)).nonzero().flatten()
        assert layout.width(n_source_layers, n) == len(columns)
        inside, local = layout.locate(torch.arange(layout.n_active), n_source_layers, n)
        assert torch.equal(inside.nonzero().flatten(), columns)
        assert torch.equal(local[inside], torch.arange(len(columns)))
        values = torch.randn(len(columns))
        target = torch.zeros(layout.n_active)
        layout.scatter_add(target, values, n_source_layers, n)
        assert torch.equal(target[columns], values) and target.count_nonzero() == values.count_nonzero()
    with pytest.raises(ValueError, match="sorted"):
        ActiveLayout(torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]), 2, 2)
    with pytest.raises(ValueError, match="span"):
        rows.add(torch.tensor([0]), torch.zeros(1, 3), torch.zeros(1, 5, 6), (2, 3))


def test_feature_influence_equals_dense_partial_influences():
    rows, dense, row_to_node = _random_rows()
    probs = torch.tensor([0.5, 0.3, 0.1])
    expected = partial_influences(dense, probs, row_to_node)[: rows.n_active]
    assert torch.allclose(rows.feature_influence(probs), expected, rtol=1e-5, atol=1e-7)
    assert expected.abs().sum() > 0


def test_assemble_equals_dense_packaging():
    rows, dense, row_to_node = _random_rows()
    n_active, n_other, n_logits = rows.n_active, rows.n_other, 3
    selected = row_to_node[n_logits:].sort().values
    adjacency = rows.assemble(selected, n_logits)
    # circuit-tracer's packaging: keep selected + other columns, sort feature rows, logits last
    columns = torch.cat([selected, torch.arange(n_active, n_active + n_other)])
    feature_rows = dense[n_logits:][row_to_node[n_logits:].argsort()]
    n_nodes = len(columns) + n_logits
    expected = torch.zeros(n_nodes, n_nodes)
    expected[: len(selected), : len(columns)] = feature_rows[:, columns]
    expected[-n_logits:, : len(columns)] = dense[:n_logits][:, columns]
    assert torch.equal(adjacency, expected)
    assert rows.chunks == [] and rows.nbytes() == 0


def test_compact_rows_are_float16_within_their_rounding():
    """Past the memory budget every stored and later row goes to float16 with a power-of-two row
    scale: half the bytes of the feature columns, influence and the assembled adjacency within
    11-bit rounding of the float32 rows, row sums exact."""
    exact, dense, row_to_node = _random_rows()
    compact, _, _ = _random_rows(budget_bytes=500)  # the logit rows alone pass it
    assert compact.compact
    stored = [c for c in compact.chunks if c.features.numel()]  # (a span of no layers has no feature columns)
    assert len(stored) == 5 and all(c.features.dtype == torch.float16 for c in stored)
    assert all(torch.equal(c.row_sums, e.row_sums) for c, e in zip(compact.chunks, exact.chunks))
    feature_bytes = sum(c.features.nbytes for c in exact.chunks)
    assert sum(c.features.nbytes for c in compact.chunks) == feature_bytes // 2
    for c in stored:  # the scale is a power of two putting the row's peak in (2^13, 2^14]
        peak = c.features.float().abs().amax(1)
        assert ((peak > 2**13) & (peak <= 2**14)).all() and torch.equal(torch.log2(c.scale), torch.log2(c.scale).round())
    probs = torch.tensor([0.5, 0.3, 0.1])
    torch.testing.assert_close(compact.feature_influence(probs), exact.feature_influence(probs), rtol=2**-10, atol=1e-7)
    selected = row_to_node[3:].sort().values
    a, b = compact.assemble(selected, 3), exact.assemble(selected, 3)
    assert float((a - b).abs().max()) <= 2**-11 * float(b.abs().max())
    assert float((a - b).abs().max()) > 0  # rounded, not copied
    assert ((a - b).abs() <= 2**-11 * b.abs() + 1e-30).all()  # each edge within its own 11-bit rounding


def test_rows_under_the_budget_stay_float32():
    rows, _, _ = _random_rows(budget_bytes=1e9)
    assert not rows.compact and all(c.features.dtype == torch.float32 for c in rows.chunks)


def test_compact_rows_keep_tiny_zero_and_non_finite_edges_honest():
    """Edges far below their row's largest fall among float16's subnormals: each edge is within
    max(2^-11 of itself, 2^-38 of the row's largest); an all-zero row stays zero; a chunk with a
    non-finite edge stays float32."""
    from mechscope.attribution.edge_rows import _Chunk

    row = torch.tensor([1.0, -3e-12, 1e-9, 2.5e-6, 0.3, -0.7])
    chunk = _Chunk(torch.tensor([0, 1]), torch.stack([row, torch.zeros(6)]), torch.zeros(2, 1, 1),
                   torch.zeros(2), (1, 1))
    chunk.compress()
    back = chunk.feature_values()
    assert chunk.features.dtype == torch.float16
    err = (back[0] - row).abs()
    assert (err <= torch.maximum(2**-11 * row.abs(), torch.full_like(row, 2**-38))).all()
    assert float(err[1]) > 2**-11 * 3e-12  # a subnormal: worse than 11 bits of itself, within the row bound
    assert torch.equal(back[1], torch.zeros(6))
    broken = _Chunk(torch.tensor([0]), torch.tensor([[1.0, float("inf")]]), torch.zeros(1, 1, 1), torch.zeros(1), (1, 1))
    broken.compress()
    assert broken.features.dtype == torch.float32 and broken.scale is None
