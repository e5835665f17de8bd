"""Compact edge-row storage equals the dense edge matrix of circuit-tracer's algorithm."""

from __future__ import annotations

import torch

from mechscope.attribution.edge_rows import EdgeRows
from mechscope.graph.prune import partial_influences


def _random_rows(n_active=40, n_other=12, n_logits=3, batches=((5, 0), (7, 25), (4, 40), (6, 11)), seed=0):
    """Dense rows (logits first, then feature rows with zero columns past each batch's width) and the
    same rows in an EdgeRows."""
    gen = torch.Generator().manual_seed(seed)
    rows = EdgeRows(n_active, n_other)
    logit = torch.randn(n_logits, n_active + n_other, generator=gen)
    rows.add(torch.full((n_logits,), -1), logit[:, :n_active], logit[:, n_active:])
    dense, nodes = [logit], [torch.arange(n_logits) + n_active + n_other]
    order = torch.randperm(n_active, generator=gen)
    used = 0
    for k, width in batches:
        idx = order[used : used + k]
        used += k
        block = torch.randn(k, n_active + n_other, generator=gen)
        block[:, width:n_active] = 0
        rows.add(idx, block[:, :width], block[:, n_active:])
        dense.append(block)
        nodes.append(idx)
    return rows, torch.cat(dense), torch.cat(nodes)


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
