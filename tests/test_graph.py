"""Graph pruning, scores, save/load and the Neuronpedia export, on tiny-model graphs of a per-layer
set and of a cross-layer transcoder."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import SET_KINDS, TINY_PROMPT, make_tiny_set

from mechscope.attribution.attribute import AttributionConfig, attribute
from mechscope.errors import BadInputError, CorruptFileError
from mechscope.export.neuronpedia import cantor_pair, slugify, to_neuronpedia, validate_neuronpedia
from mechscope.graph.io import load_graph, save_graph
from mechscope.graph.prune import (
    compute_influence,
    graph_scores,
    kept_edges,
    logit_influence,
    node_influence,
    normalize_matrix,
    prune_graph,
)
from mechscope.replacement.replacement_model import ReplacementModel


@pytest.fixture(scope="module", params=SET_KINDS)
def rm(request, tiny_adapter):
    adapter = tiny_adapter("gemma3")
    return ReplacementModel(adapter, make_tiny_set(adapter, request.param, skip=True))


@pytest.fixture(scope="module")
def graph(rm):
    return attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=32))


def test_influence_equals_the_neumann_series(graph):
    A = normalize_matrix(graph.adjacency)
    w = graph.logit_weights()
    n = A.shape[0]
    dense = w @ (torch.linalg.inv(torch.eye(n) - A.double()).float() - torch.eye(n))
    assert torch.allclose(compute_influence(A, w), dense, atol=1e-5)


def test_logit_influence_splits_the_total_influence_by_logit(graph):
    total = compute_influence(normalize_matrix(graph.adjacency), graph.logit_weights())
    per_logit = [logit_influence(graph, k) for k in range(graph.n_logits)]
    weighted = sum(p * infl for p, infl in zip(graph.logit_probabilities, per_logit))
    assert torch.allclose(weighted, total, atol=1e-6)
    direct = normalize_matrix(graph.adjacency)[graph.logit_offset]
    assert (per_logit[0] >= direct - 1e-7).all() and float(per_logit[0].sum()) > 0
    with pytest.raises(BadInputError, match="logit index 99"):
        logit_influence(graph, 99)
    # the blocked computation pruning ranks nodes by, public as node_influence
    torch.testing.assert_close(node_influence(graph), total, rtol=1e-5, atol=1e-7)


def _dense_prune(graph, node_threshold, edge_threshold):
    """The naive pruning: normalised N x N copies, full sorts (circuit-tracer's ``prune_graph``)."""
    A, w = graph.adjacency.float(), graph.logit_weights()

    def cutoff(scores, threshold):
        ordered = scores.flatten().sort(descending=True).values
        if threshold >= 1.0:  # keep every positive score (a cumulative sum can reach 1 a rounding early)
            return ordered[ordered > 0].min()
        cumulative = ordered.cumsum(0) / ordered.sum()
        return ordered[min(int(torch.searchsorted(cumulative, torch.tensor(threshold))), len(ordered) - 1)]

    influence = compute_influence(normalize_matrix(A), w)
    node_mask = influence >= cutoff(influence, node_threshold)
    node_mask[graph.token_offset :] = True
    masked = A.clone()
    masked[~node_mask] = 0
    masked[:, ~node_mask] = 0
    masked = normalize_matrix(masked)
    scores = masked * (compute_influence(masked, w) + w)[:, None]
    return node_mask, scores >= cutoff(scores, edge_threshold)


@pytest.mark.parametrize("block_rows", [7, 1024])
def test_blocked_pruning_and_scores_equal_the_dense_ones(graph, monkeypatch, block_rows):
    """Pruning and scores work on row blocks of |A| without normalised copies; the result is the
    dense computation's (before the clean-up of nodes left without edges)."""
    import mechscope.graph.prune as prune

    monkeypatch.setattr(prune, "_BLOCK_ROWS", block_rows)
    for node_threshold, edge_threshold in ((0.8, 0.98), (0.5, 0.9), (0.8, 1.0)):
        node_mask, edge_mask = _dense_prune(graph, node_threshold, edge_threshold)
        pruned = prune_graph(graph, node_threshold, edge_threshold)
        assert torch.equal(pruned.node_mask, pruned.node_mask & node_mask)  # clean-up only removes
        kept = pruned.node_mask
        assert torch.equal(pruned.edge_mask, edge_mask & kept[:, None] & kept[None, :])
        # the mask is held over the node threshold's candidates only; row blocks rebuild it
        assert len(pruned.candidates) < graph.n_nodes and pruned.candidate_edges.shape == (len(pruned.candidates),) * 2
        blocks = [pruned.edge_mask_rows(start, start + 5) for start in range(0, graph.n_nodes, 5)]
        assert torch.equal(torch.cat(blocks), pruned.edge_mask)
        # what save_graph and the Neuronpedia export write: the kept non-zero edges in row-major order
        expected = (graph.adjacency != 0) & pruned.edge_mask
        for edges in (pruned, None):
            mask = expected if edges is not None else graph.adjacency != 0
            targets, sources, weights = (torch.cat(parts) for parts in zip(*kept_edges(graph.adjacency, edges, block_rows=3)))
            assert torch.equal(torch.stack([targets, sources]), torch.stack(mask.nonzero(as_tuple=True)))
            assert torch.equal(weights, graph.adjacency[mask])
            if edges is not None:  # pruned: only edges between kept nodes
                assert bool(kept[targets].all() and kept[sources].all())
    normalized = normalize_matrix(graph.adjacency)
    influence = compute_influence(normalized, graph.logit_weights())
    errors = slice(graph.error_offset, graph.token_offset)
    tokens = slice(graph.token_offset, graph.logit_offset)
    replacement = influence[tokens].sum() / (influence[tokens].sum() + influence[errors].sum())
    output = influence + graph.logit_weights()
    completeness = ((1 - normalized[:, errors].sum(-1)) * output).sum() / output.sum()
    assert graph_scores(graph) == pytest.approx((float(replacement), float(completeness)), rel=1e-6)


def test_pruning_keeps_more_as_thresholds_rise(graph):
    node_counts, edge_counts = [], []
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.9, 0.99):
        pruned = prune_graph(graph, node_threshold=threshold, edge_threshold=0.98)
        node_counts.append(int(pruned.node_mask.sum()))
    for threshold in (0.5, 0.8, 0.9, 0.98, 0.999):
        pruned = prune_graph(graph, node_threshold=0.8, edge_threshold=threshold)
        edge_counts.append(int(pruned.edge_mask.sum()))
    assert node_counts == sorted(node_counts) and node_counts[0] < node_counts[-1]
    assert edge_counts == sorted(edge_counts) and edge_counts[0] < edge_counts[-1]


def test_pruning_invariants(graph):
    pruned = prune_graph(graph, 0.8, 0.98)
    keep_from = graph.token_offset
    assert pruned.node_mask[keep_from:].all()  # tokens and logits always kept
    # kept edges join kept nodes, kept features have an incoming and an outgoing edge
    rows, cols = pruned.edge_mask.nonzero(as_tuple=True)
    assert pruned.node_mask[rows].all() and pruned.node_mask[cols].all()
    for node in pruned.node_mask[: graph.n_features].nonzero().flatten().tolist():
        assert pruned.edge_mask[node].any() and pruned.edge_mask[:, node].any()
    assert ((pruned.cumulative_scores >= 0) & (pruned.cumulative_scores <= 1 + 1e-6)).all()
    with pytest.raises(BadInputError, match="node_threshold"):
        prune_graph(graph, node_threshold=1.5)


def test_scores_are_fractions_and_hit_one_without_errors(graph):
    replacement, completeness = graph_scores(graph)
    assert 0 < replacement < 1 and 0 < completeness < 1
    perfect = dataclasses.replace(graph, adjacency=graph.adjacency.clone())
    perfect.adjacency[:, perfect.error_offset : perfect.token_offset] = 0
    assert graph_scores(perfect) == pytest.approx((1.0, 1.0))


def test_save_load_round_trip(graph, tmp_path):
    save_graph(graph, tmp_path / "g")
    loaded = load_graph(tmp_path / "g")
    assert loaded.config.pop("saved_edges")["kept"] == "all"
    for name, value in graph.__dict__.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, getattr(loaded, name)), name
        else:
            assert value == getattr(loaded, name), name
    (tmp_path / "g" / "graph.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CorruptFileError):
        load_graph(tmp_path / "g")


def test_a_pruned_save_holds_exactly_the_exchange_graph(graph, tmp_path):
    """What trace keeps by default: the pruned graph's edges, in a file proportional to them, and
    exactly the nodes and links of the exchange JSON that intervene, supernodes and serve read."""
    from mechscope.graph.io import saved_edges

    pruned = prune_graph(graph, 0.8, 0.98)
    save_graph(graph, tmp_path / "full")
    save_graph(graph, tmp_path / "pruned", pruned, (0.8, 0.98))
    assert saved_edges(tmp_path / "pruned") == {"kept": "pruned", "node_threshold": 0.8, "edge_threshold": 0.98,
                                                "n_edges": int(pruned.edge_mask.sum())}
    small, full = (tmp_path / d / "graph.safetensors" for d in ("pruned", "full"))
    assert small.stat().st_size < 0.5 * full.stat().st_size
    loaded = load_graph(tmp_path / "pruned")
    assert loaded.config["saved_edges"]["kept"] == "pruned"  # the Python API can tell the edges were cut
    assert torch.equal(loaded.adjacency, torch.where(pruned.edge_mask, graph.adjacency, torch.zeros(())))
    exchange = to_neuronpedia(graph, pruned, "x")
    again = to_neuronpedia(loaded, pruned, "x")
    links = {(link["source"], link["target"]): link["weight"] for link in exchange["links"]}
    assert {(link["source"], link["target"]): link["weight"] for link in again["links"]} == links
    assert [n["node_id"] for n in again["nodes"]] == [n["node_id"] for n in exchange["nodes"]]
    index = loaded.adjacency.nonzero().tolist()
    assert {(loaded.node_id(s), loaded.node_id(t)) for t, s in index} == set(links)


def test_schema_1_dense_graphs_still_load(graph, tmp_path):
    from safetensors.torch import save_file

    save_graph(graph, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "graph.json").read_text())
    meta["schema_version"] = 1
    (tmp_path / "g" / "graph.json").write_text(json.dumps(meta))
    tensors = {name: getattr(graph, name).contiguous() for name in ("input_ids", "active_features", "activation_values",
                                                                     "selected_features", "logit_token_ids",
                                                                     "logit_probabilities", "adjacency")}
    save_file(tensors, str(tmp_path / "g" / "graph.safetensors"))
    assert torch.equal(load_graph(tmp_path / "g").adjacency, graph.adjacency)


def test_node_ids_follow_the_conventions(graph):
    ids = [graph.node_id(i) for i in range(graph.n_nodes)]
    assert len(set(ids)) == len(ids)
    layer, pos, feature, _ = graph.feature_of(0)
    assert ids[0] == f"{layer}_{feature}_{pos}"
    assert ids[graph.error_offset] == "0_-1_0"
    assert ids[graph.token_offset] == f"E_{int(graph.input_ids[0])}_0"
    assert ids[graph.logit_offset] == f"{graph.n_layers + 1}_{int(graph.logit_token_ids[0])}_{graph.n_pos - 1}"
    assert cantor_pair(3, 5) == 41 and cantor_pair(0, 0) == 0


def test_export_validates_and_matches_pruning(rm, graph):
    pruned = prune_graph(graph, 0.8, 0.98)
    data = to_neuronpedia(graph, pruned, slugify(TINY_PROMPT), 0.8, 0.98, labels={}, supernodes=[["grp", "E_2_0"]])
    validate_neuronpedia(data)
    assert json.loads(json.dumps(data)) == data  # plain JSON
    assert len(data["nodes"]) == int(pruned.node_mask.sum())
    assert len(data["links"]) == int((pruned.edge_mask & (graph.adjacency != 0)).sum())
    types = {n["feature_type"] for n in data["nodes"]}
    assert types <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert {"cross layer transcoder", "embedding", "logit"} <= types
    # feature nodes name the set's features (circuit-tracer's "cross layer transcoder" for either kind)
    # with their activation by the set's encoder; the metadata names the set and its kind
    assert (data["metadata"]["scan"], data["metadata"]["transcoder_kind"]) == (rm.transcoders.scan, rm.transcoders.kind)
    mlp_inputs, _ = rm.model.run_with_mlp_sites(graph.input_ids[None])
    for node in (n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"):
        layer, feature, pos = (int(x) for x in node["node_id"].split("_"))
        assert (node["layer"], node["ctx_idx"], node["feature"]) == (str(layer), pos, cantor_pair(layer, feature))
        expected = rm.transcoders.encode(layer, mlp_inputs[layer][0, pos].float())[feature]
        assert node["activation"] == pytest.approx(float(expected), rel=1e-5) and node["activation"] > 0
    assert data["qParams"]["supernodes"] == [["grp", "E_2_0"]]
    weight = {(l["source"], l["target"]): l["weight"] for l in data["links"]}
    index = graph.node_index()
    source, target = next(iter(weight))
    assert weight[(source, target)] == pytest.approx(float(graph.adjacency[index[target], index[source]]))
    broken = {**data, "links": data["links"] + [{"source": "nope", "target": data["nodes"][0]["node_id"], "weight": 1.0}]}
    with pytest.raises(BadInputError, match="not in the graph"):
        validate_neuronpedia(broken)
    with pytest.raises(BadInputError, match="schema"):
        validate_neuronpedia({"metadata": {}, "qParams": {}, "nodes": [], "links": []})


def test_unpruned_export_keeps_every_node(graph):
    data = to_neuronpedia(graph, None, "all")
    validate_neuronpedia(data)
    assert len(data["nodes"]) == graph.n_nodes
    assert len(data["links"]) == int((graph.adjacency != 0).sum())
