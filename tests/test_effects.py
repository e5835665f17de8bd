"""Signed direct and total effects: the sum over edge paths, and what a small change of the source
does to the logit in the local replacement model with every downstream feature free to respond."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PROMPT
from test_attribution import _frozen_sites

from mechscope.attribution.attribute import AttributionConfig, attribute
from mechscope.graph.effects import node_scales, signed_effects
from mechscope.graph.graph import Graph, NodeKind
from mechscope.replacement.replacement_model import ReplacementModel


def _path_sum(A: torch.Tensor, scales: torch.Tensor, source: int, target: int) -> float:
    """Every path source -> ... -> target, enumerated one by one (intermediate edges per unit activation)."""
    total = 0.0

    def walk(node: int, product: float) -> None:
        nonlocal total
        for nxt in torch.nonzero(A[:, node]).flatten().tolist():
            weight = product * float(A[nxt, node]) / (float(scales[node]) if node != source else 1.0)
            if nxt == target:
                total += weight
            else:
                walk(nxt, weight)

    walk(source, 1.0)
    return total


def _tiny_graph(seed: int) -> Graph:
    """Three layers of two features, two positions, one logit: a random DAG in the graph's node order."""
    gen = torch.Generator().manual_seed(seed)
    n_layers, n_pos = 3, 2
    active = torch.tensor([[layer, pos, f] for layer in range(n_layers) for pos in range(n_pos) for f in range(2)])
    n_feat = len(active)
    n = n_feat + n_layers * n_pos + n_pos + 1
    A = torch.zeros(n, n)
    layer_of = [int(active[i, 0]) for i in range(n_feat)] + [i // n_pos for i in range(n_layers * n_pos)] + [-1] * n_pos
    for t in range(n_feat):
        for s in range(n_feat + n_layers * n_pos + n_pos):
            if layer_of[s] < layer_of[t] and torch.rand(1, generator=gen) < 0.7:
                A[t, s] = torch.randn(1, generator=gen)
    A[-1, : n - 1] = torch.randn(n - 1, generator=gen)
    return Graph("p", torch.arange(n_pos), ["a", "b"], "m", "s", n_layers, active,
                 0.5 + torch.rand(n_feat, generator=gen), torch.arange(n_feat), torch.tensor([7]), ["x"],
                 torch.tensor([1.0]), A)


@pytest.mark.parametrize("seed", range(4))
def test_total_effect_is_the_sum_over_edge_paths(seed):
    graph = _tiny_graph(seed)
    effects = signed_effects(graph)
    scales = node_scales(graph)
    target = graph.logit_offset
    for source in range(graph.logit_offset):
        assert float(effects.direct[source, 0]) == pytest.approx(float(graph.adjacency[target, source]))
        assert float(effects.total[source, 0]) == pytest.approx(_path_sum(graph.adjacency, scales, source, target),
                                                                rel=1e-5, abs=1e-6)
    assert not torch.allclose(effects.total, effects.direct)  # indirect paths count


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_total_effect_predicts_nudging_a_source_in_the_replacement_model(tiny_adapter, make_tiny_transcoders, family):
    """Scale one feature's activation by 1 + eps in the frozen replacement model whose features are
    recomputed from their live inputs (errors held): the demeaned logit moves by eps * total effect."""
    adapter = tiny_adapter(family)
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter, skip=True))
    graph = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=32))
    effects = signed_effects(graph)
    trace = rm.trace(graph.input_ids)
    W_U = rm.model.W_U
    vector = W_U[graph.logit_token_ids[0]] - W_U.mean(0)
    eps = 1e-3

    def logit(nudge: tuple[int, int, torch.Tensor] | None) -> float:
        outputs = {}

        def replacement(layer):
            def fn(x):  # x: (1, pos, d_model)
                out = rm.transcoders[layer].decode(rm.transcoders.encode(layer, x[0]), x[0]) + trace.errors[layer]
                clean = trace.run.mlp_outputs[layer]
                skip = rm.transcoders.skip(layer, x[0])
                bos = clean[: trace.first_pos] - (0 if skip is None else rm.transcoders.skip(layer, trace.run.mlp_inputs[layer])[: trace.first_pos])
                out[: trace.first_pos] = bos + (0 if skip is None else skip[: trace.first_pos])
                if nudge is not None and nudge[0] == layer:
                    out[nudge[1]] += nudge[2]
                outputs[layer] = out
                return out[None]

            return fn

        final = rm.model.frozen_forward(trace.run.input_ids, trace.run.frozen, trace.run.embeddings[None],
                                        [replacement(layer) for layer in range(rm.model.n_layers)])
        return float(vector @ final[0, -1])

    base = logit(None)
    checked = 0
    for node in torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(0))[:12].tolist():
        layer, pos, feature, activation = graph.feature_of(node)
        delta = eps * activation * rm.transcoders[layer].W_dec[feature]
        effect = (logit((layer, pos, delta)) - base) / eps
        total, direct = float(effects.total[node, 0]), float(effects.direct[node, 0])
        assert effect == pytest.approx(total, rel=2e-2, abs=2e-3), (node, effect, total, direct)
        checked += abs(total - direct) > 0.05 * max(abs(total), 1e-3)
    assert checked >= 2  # indirect paths mattered for several of them


def test_exported_nodes_carry_their_signed_effects_next_to_influence(tiny_adapter, make_tiny_transcoders):
    from mechscope.export.neuronpedia import to_neuronpedia, validate_neuronpedia
    from mechscope.graph.prune import prune_graph

    adapter = tiny_adapter("llama")
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter))
    graph = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=20, batch_size=32))
    effects = signed_effects(graph)
    data = to_neuronpedia(graph, prune_graph(graph), "x")
    validate_neuronpedia(data)
    assert data["metadata"]["effects_target"] == graph.logit_tokens[0]
    index = {graph.node_id(i): i for i in range(graph.n_nodes)}
    for node in data["nodes"]:
        i = index[node["node_id"]]
        if graph.node_kind(i) == NodeKind.LOGIT:
            assert "total_effect" not in node
            continue
        assert node["direct_effect"] == pytest.approx(float(effects.direct[i, 0]))
        assert node["total_effect"] == pytest.approx(float(effects.total[i, 0]))
    assert any(n.get("total_effect", 0) < 0 for n in data["nodes"]) and any(n.get("total_effect", 0) > 0 for n in data["nodes"])
