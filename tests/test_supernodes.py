"""Supernodes: storage in qParams, suggestions from edge profiles, the grouped view."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PROMPT

from mechscope.attribution.attribute import AttributionConfig, attribute
from mechscope.errors import BadInputError
from mechscope.export.neuronpedia import to_neuronpedia, validate_neuronpedia
from mechscope.graph.prune import prune_graph
from mechscope.graph.supernodes import (
    Supernode,
    add_supernode,
    dense_feature_nodes,
    read_supernodes,
    remove_supernode,
    suggest_supernodes,
    supernode_view,
)
from mechscope.replacement.replacement_model import ReplacementModel


def _node(node_id, kind, layer, pos, clerp=""):
    return {"node_id": node_id, "feature_type": kind, "layer": str(layer), "ctx_idx": pos, "clerp": clerp}


@pytest.fixture
def two_hop() -> dict:
    """Dallas -> Texas -> Austin in miniature: two 'Texas' features read the 'Dallas' token, two
    'say Austin' features read the Texas features and write the ' Austin' logit; one stray
    feature reads 'capital' and writes the ' Texas' logit."""
    nodes = [
        _node("E_10_1", "embedding", "E", 1), _node("E_11_2", "embedding", "E", 2),
        _node("1_5_1", "cross layer transcoder", 1, 1), _node("2_7_1", "cross layer transcoder", 2, 1),
        _node("4_3_2", "cross layer transcoder", 4, 2), _node("5_9_2", "cross layer transcoder", 5, 2),
        _node("3_8_2", "cross layer transcoder", 3, 2),
        _node("7_100_2", "logit", 7, 2, 'Output " Austin" (p=0.600)'),
        _node("7_200_2", "logit", 7, 2, 'Output " Texas" (p=0.200)'),
    ]
    links = [("E_10_1", "1_5_1", 1.0), ("E_10_1", "2_7_1", 0.8), ("1_5_1", "4_3_2", 0.5), ("2_7_1", "4_3_2", 0.4),
             ("1_5_1", "5_9_2", 0.6), ("2_7_1", "5_9_2", 0.5), ("4_3_2", "7_100_2", 1.0), ("5_9_2", "7_100_2", 0.9),
             ("E_11_2", "3_8_2", 1.0), ("3_8_2", "7_200_2", 0.7)]
    return {"metadata": {"prompt_tokens": ["<bos>", " Dallas", " capital"]}, "qParams": {"supernodes": []},
            "nodes": nodes, "links": [{"source": s, "target": t, "weight": w} for s, t, w in links]}


def test_suggestions_group_features_with_shared_edge_profiles(two_hop):
    suggestions = suggest_supernodes(two_hop, min_similarity=0.8)
    groups = sorted(sorted(s.node_ids) for s in suggestions)
    assert groups == [["1_5_1", "2_7_1"], ["4_3_2", "5_9_2"]]  # the stray feature stays alone
    labels = {tuple(sorted(s.node_ids)): s.label for s in suggestions}
    assert labels[("1_5_1", "2_7_1")] == "Dallas (L1-L2) -> ' Austin'"
    assert labels[("4_3_2", "5_9_2")] == "capital (L4-L5) -> ' Austin'"
    assert all(0.8 <= s.score <= 1.0 for s in suggestions)
    # a stricter threshold splits nothing that is not identical; min_size 1 keeps singletons
    assert len(suggest_supernodes(two_hop, min_similarity=0.8, min_size=1)) == 3


def test_labels_name_suggestions_and_dense_features_are_left_out(two_hop):
    import copy

    data = copy.deepcopy(two_hop)
    nodes = {n["node_id"]: n for n in data["nodes"]}
    nodes["1_5_1"]["clerp"] = "Dallas"  # a feature label from the store, exported as clerp
    nodes["2_7_1"]["clerp"] = "Dallas"
    labels = {tuple(sorted(s.node_ids)): s.label for s in suggest_supernodes(data, min_similarity=0.8)}
    assert labels[("1_5_1", "2_7_1")] == "Dallas (L1-L2) -> ' Austin'"
    nodes["5_9_2"]["density"] = 0.97  # active on almost every token
    nodes["4_3_2"]["density"] = 0.01
    assert dense_feature_nodes(data) == ["5_9_2"]
    groups = sorted(sorted(s.node_ids) for s in suggest_supernodes(data, min_similarity=0.8))
    assert groups == [["1_5_1", "2_7_1"]]  # 4_3_2 has no partner left
    groups = sorted(sorted(s.node_ids) for s in suggest_supernodes(data, min_similarity=0.8, max_density=None))
    assert groups == [["1_5_1", "2_7_1"], ["4_3_2", "5_9_2"]]
    with pytest.raises(BadInputError, match="max_density"):
        suggest_supernodes(data, max_density=1.5)


def test_add_remove_and_the_grouped_view(two_hop):
    add_supernode(two_hop, Supernode("Texas", ("1_5_1", "2_7_1")))
    add_supernode(two_hop, Supernode("say Austin", ("4_3_2", "5_9_2")))
    assert [s.label for s in read_supernodes(two_hop)] == ["Texas", "say Austin"]
    view = supernode_view(two_hop)
    assert view.names[:2] == ["Texas", "say Austin"]
    total = sum(link["weight"] for link in two_hop["links"])
    assert float(view.adjacency.sum()) == pytest.approx(total)
    edges = {(s, t): w for s, t, w in view.edges()}
    assert edges[("Texas", "say Austin")] == pytest.approx(0.5 + 0.4 + 0.6 + 0.5)
    assert edges[("say Austin", "7_100_2")] == pytest.approx(1.9)
    assert edges[("E_10_1", "Texas")] == pytest.approx(1.8)
    with pytest.raises(BadInputError, match="'Texas' exists"):
        add_supernode(two_hop, Supernode("Texas", ("3_8_2",)))
    add_supernode(two_hop, Supernode("Texas", ("3_8_2",)), replace=True)
    assert read_supernodes(two_hop)[-1] == Supernode("Texas", ("3_8_2",))
    remove_supernode(two_hop, "Texas")
    assert [s.label for s in read_supernodes(two_hop)] == ["say Austin"]


def test_bad_supernodes_are_clear_errors(two_hop):
    with pytest.raises(BadInputError, match=r"\['9_9_9'\] are not in the graph"):
        add_supernode(two_hop, Supernode("x", ("1_5_1", "9_9_9")))
    with pytest.raises(BadInputError, match="non-empty label"):
        add_supernode(two_hop, Supernode(" ", ("1_5_1",)))
    with pytest.raises(BadInputError, match="at least one node"):
        add_supernode(two_hop, Supernode("x", ()))
    with pytest.raises(BadInputError, match="no supernode labelled 'nope'"):
        remove_supernode(two_hop, "nope")
    with pytest.raises(BadInputError, match="min_similarity"):
        suggest_supernodes(two_hop, min_similarity=1.5)


def test_suggestions_on_a_real_graph_export_validate(tiny_adapter, make_tiny_transcoders):
    adapter = tiny_adapter("llama")
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter))
    graph = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=32))
    data = to_neuronpedia(graph, prune_graph(graph, 0.8, 0.98), "tiny")
    suggestions = suggest_supernodes(data, min_similarity=0.3)
    assert suggestions
    members = [n for s in suggestions for n in s.node_ids]
    assert len(members) == len(set(members))  # disjoint
    for s in suggestions:
        add_supernode(data, s)
    validate_neuronpedia(data)
    view = supernode_view(data)
    assert torch.isclose(view.adjacency.sum(), torch.tensor(sum(l["weight"] for l in data["links"])), rtol=1e-4)


def _merge_loop(similarity: torch.Tensor, threshold: float) -> list[list[int]]:
    """The original reference: merge the pair of clusters with the highest mean similarity while it
    is at least ``threshold`` (quadratic per merge; fine for small graphs)."""
    clusters = [[i] for i in range(len(similarity))]
    while len(clusters) > 1:
        best, pair = threshold, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                mean = float(similarity[clusters[a]][:, clusters[b]].mean())
                if mean >= best:
                    best, pair = mean, (a, b)
        if pair is None:
            break
        a, b = pair
        clusters[a] = clusters[a] + clusters.pop(b)
    return clusters


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_scipy_average_linkage_gives_the_merge_loops_groups(seed, threshold):
    from mechscope.graph.supernodes import _average_linkage

    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 12, generator=gen)  # five families of profiles, noisy members
    profiles = centres[torch.randint(0, 5, (40,), generator=gen)] + 0.7 * torch.randn(40, 12, generator=gen)
    profiles = profiles / profiles.norm(dim=1, keepdim=True)
    similarity = profiles @ profiles.T
    expected = sorted(sorted(c) for c in _merge_loop(similarity, threshold))
    got = _average_linkage(similarity, threshold)
    assert sorted(got) == expected
    assert 1 < len(expected) < 40  # the threshold really cuts the tree


def test_suggestions_on_a_thousand_feature_graph_finish(two_hop):
    """A graph of 1,000 feature nodes (the README graph has 969): the old merge loop took minutes
    per pass here; average linkage finishes (no timing asserted: see benchmarks for speed)."""
    import random

    rng = random.Random(0)
    nodes = [{"node_id": f"{i % 18}_{i}_{i % 9}", "feature_type": "cross layer transcoder", "layer": str(i % 18),
              "ctx_idx": i % 9, "clerp": ""} for i in range(1000)]
    nodes.append({"node_id": "19_7_8", "feature_type": "logit", "layer": "19", "ctx_idx": 8, "clerp": 'Output " x"'})
    links = []
    for _ in range(20000):  # acyclic, as attribution graphs are: edges go to a later layer or to the logit
        a, b = rng.randrange(1000), rng.randrange(1001)
        if b == 1000 or int(nodes[a]["layer"]) < int(nodes[b]["layer"]):
            links.append({"source": nodes[a]["node_id"], "target": nodes[b]["node_id"], "weight": rng.uniform(-1, 1)})
    data = {"metadata": {"prompt_tokens": [f"t{i}" for i in range(9)]}, "nodes": nodes, "links": links}
    suggestions = suggest_supernodes(data, min_similarity=0.1)
    members = [n for s in suggestions for n in s.node_ids]
    assert len(members) == len(set(members)) and all(len(s.node_ids) >= 2 for s in suggestions)
