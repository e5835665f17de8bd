"""Interventions on tiny models: in the frozen, constrained regime edges predict their effects."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_PROMPT
from mechscope.attribution.attribute import AttributionConfig, attribute
from mechscope.errors import BadInputError
from mechscope.graph.graph import NodeKind
from mechscope.interventions.intervene import InterventionConfig, run_interventions
from mechscope.interventions.records import (
    ErrorTarget,
    FeatureTarget,
    Intervention,
    SupernodeTarget,
    target_from_node_id,
)
from mechscope.replacement.replacement_model import ReplacementModel


def _setup(tiny_adapter, make_tiny_transcoders, family, skip=False):
    adapter = tiny_adapter(family)
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter, skip=skip))
    graph = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=32))
    return rm, graph


def _pre_activations(rm, result, graph, targets):
    values = []
    for node in targets:
        layer, pos, feature, _ = graph.feature_of(node)
        values.append(rm.transcoders.pre_activations(layer, result.mlp_inputs[layer][pos])[feature])
    return torch.stack(values)


@pytest.mark.parametrize("skip", [False, True], ids=["no-skip", "skip"])
def test_constrained_frozen_effect_equals_edge_times_change(tiny_adapter, make_tiny_transcoders, family, skip):
    check_constrained_frozen_effect_equals_edge_times_change(*_setup(tiny_adapter, make_tiny_transcoders, family, skip))


def check_constrained_frozen_effect_equals_edge_times_change(rm, graph) -> None:
    n_layers = graph.n_layers
    config = InterventionConfig(freeze_attention=True, constrained_layers=range(n_layers))
    gen = torch.Generator().manual_seed(1)
    sources = torch.randperm(graph.n_features, generator=gen)[:4].tolist()
    sources.append(graph.error_offset + graph.n_pos * 0 + graph.n_pos - 2)  # an error node of layer 0
    targets = [n for n in range(graph.n_features) if graph.feature_of(n)[0] > 0]
    base = run_interventions(rm, graph.input_ids, [], config)
    base_pre = _pre_activations(rm, base, graph, targets)
    compared = 0
    for source, factor in zip(sources, (-10.0, 3.0, 0.0, 2.5, -1.0)):
        if graph.node_kind(source) == NodeKind.FEATURE:
            layer, pos, feature, _ = graph.feature_of(source)
            intervention = Intervention(FeatureTarget(layer, feature, (pos,)), "scale", factor)
        else:
            layer, pos = graph.error_of(source)
            intervention = Intervention(ErrorTarget(layer, (pos,)), "scale", factor)
        result = run_interventions(rm, graph.input_ids, [intervention], config)
        effect = _pre_activations(rm, result, graph, targets) - base_pre
        predicted = (factor - 1.0) * graph.adjacency[targets, source]
        assert torch.allclose(effect, predicted, atol=1e-4, rtol=1e-3), (source, (effect - predicted).abs().max())
        compared += int((predicted.abs() > 1e-3).sum())
    assert compared > 10  # real, non-zero edges were checked


def test_constrained_frozen_logit_effect_equals_edge(tiny_adapter, make_tiny_transcoders):
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "llama", skip=True)
    config = InterventionConfig(constrained_layers=range(graph.n_layers))
    node = int(graph.adjacency[graph.logit_offset, : graph.n_features].abs().argmax())
    layer, pos, feature, _ = graph.feature_of(node)
    result = run_interventions(rm, graph.input_ids, [Intervention(FeatureTarget(layer, feature, (pos,)), "scale", -10.0)],
                               config)
    demeaned = lambda logits: logits - logits.mean()  # noqa: E731  (the demeaned logit of every target)
    ids = graph.logit_token_ids
    effect = demeaned(result.intervened_logits)[ids] - demeaned(result.clean_logits)[ids]
    predicted = -11.0 * graph.adjacency[graph.logit_offset :, node]
    assert float(predicted.abs().max()) > 1e-3
    assert torch.allclose(effect, predicted, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "live"])
@pytest.mark.parametrize("layers", [None, "all"], ids=["iterative", "constrained"])
def test_scale_one_changes_nothing(tiny_adapter, make_tiny_transcoders, family, freeze, layers):
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, family)
    config = InterventionConfig(freeze_attention=freeze, generate=4,
                                constrained_layers=range(graph.n_layers) if layers else None)
    node_ids = [graph.node_id(n) for n in range(graph.n_features)][:5] + [graph.node_id(graph.error_offset + 3)]
    supernode = SupernodeTarget("all", tuple(target_from_node_id(i) for i in node_ids))
    result = run_interventions(rm, graph.input_ids, [Intervention(supernode, "scale", 1.0)], config,
                               readouts={"some": [m for m in supernode.members if isinstance(m, FeatureTarget)]})
    assert torch.allclose(result.intervened_logits, result.clean_logits, atol=1e-5, rtol=0)
    assert result.intervened_continuation == result.clean_continuation
    assert result.readouts["some"].percent_of_clean == pytest.approx(100.0, abs=1e-3)


def test_clean_continuation_is_greedy_generation(tiny_adapter, make_tiny_transcoders):
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "gemma3")
    result = run_interventions(rm, graph.input_ids, [], InterventionConfig(generate=5))
    expected = rm.model.hf.generate(graph.input_ids[None], max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert result.clean_continuation == expected[0, graph.n_pos :].tolist()


def test_iterative_zeroing_matches_a_manual_edit(tiny_adapter, make_tiny_transcoders):
    """Zeroing a feature live = subtracting its live decoder contribution at that layer, by hand."""
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "qwen2")
    layer, pos, feature, _ = graph.feature_of(0)
    tc = rm.transcoders[layer]

    def edit(l, x, y):
        if l != layer:
            return y
        a = tc.encode(x[0, pos])[feature]
        y = y.clone()
        y[0, pos] -= a * tc.W_dec[feature]
        return y

    expected = rm.model.output_logits(rm.model.edited_forward(graph.input_ids[None], edit)[0, -1])
    result = run_interventions(rm, graph.input_ids, [Intervention(FeatureTarget(layer, feature, (pos,)), "zero")],
                               InterventionConfig(freeze_attention=False))
    assert torch.allclose(result.intervened_logits, expected, atol=1e-5)
    assert float((result.intervened_logits - result.clean_logits).abs().max()) > 1e-4


def test_a_given_clean_trace_is_reused_unchanged(tiny_adapter, make_tiny_transcoders):
    """Many interventions on one prompt may share its clean run: passing ``trace`` gives the same
    results as tracing anew, and leaves the trace as it was."""
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "gemma3")
    clean = rm.trace(graph.input_ids)
    before = [a.clone() for a in clean.activations], [e.clone() for e in clean.errors]
    for node in range(3):
        layer, pos, feature, _ = graph.feature_of(node)
        for config in (InterventionConfig(constrained_layers=range(rm.model.n_layers)),
                       InterventionConfig(freeze_attention=False)):
            edit = [Intervention(FeatureTarget(layer, feature, (pos,)), "zero")]
            fresh = run_interventions(rm, graph.input_ids, edit, config)
            reused = run_interventions(rm, graph.input_ids, edit, config, trace=clean)
            torch.testing.assert_close(reused.intervened_logits, fresh.intervened_logits, atol=0, rtol=0)
            torch.testing.assert_close(reused.clean_logits, fresh.clean_logits, atol=0, rtol=0)
    for kept, was in zip(clean.activations + clean.errors, before[0] + before[1]):
        assert torch.equal(kept, was)
    other = rm.trace(graph.input_ids[:-1])
    with pytest.raises(BadInputError, match="another prompt"):
        run_interventions(rm, graph.input_ids, [], InterventionConfig(), trace=other)


def test_injection_and_supernode_readout(tiny_adapter, make_tiny_transcoders):
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "llama")
    trace = rm.trace(graph.input_ids)
    layer, pos = 1, graph.n_pos - 1
    inactive = int((trace.activations[layer][pos] == 0).nonzero()[0])
    active = [FeatureTarget(*graph.feature_of(n)[:1], graph.feature_of(n)[2], (graph.feature_of(n)[1],))
              for n in range(graph.n_features) if graph.feature_of(n)[0] == 0][:3]
    result = run_interventions(
        rm, graph.input_ids,
        [Intervention(FeatureTarget(layer, inactive, (pos,)), "add", 4.0),
         Intervention(SupernodeTarget("early", tuple(active)), "scale", -10.0)],
        InterventionConfig(freeze_attention=True),
        readouts={"early": active, "injected": [FeatureTarget(layer, inactive, (pos,))]},
    )
    assert result.readouts["early"].percent_of_clean == pytest.approx(-1000.0, rel=1e-5)
    assert float(result.readouts["injected"].intervened[0]) == pytest.approx(4.0)
    assert float(result.readouts["injected"].clean[0]) == 0.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda g: [Intervention(FeatureTarget(99, 0, (1,)), "scale", 2.0)], "layer 99"),
        (lambda g: [Intervention(FeatureTarget(0, 10_000, (1,)), "scale", 2.0)], "feature 10000"),
        (lambda g: [Intervention(FeatureTarget(0, 0, (g.n_pos + 3,)), "scale", 2.0)], "position"),
        (lambda g: [Intervention(FeatureTarget(0, 0, (0,)), "scale", 2.0)], "position 0"),
    ],
    ids=["layer", "feature", "position", "bos"],
)
def test_out_of_range_targets_are_clear_errors(tiny_adapter, make_tiny_transcoders, make, message):
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "llama")
    with pytest.raises(BadInputError, match=message):
        run_interventions(rm, graph.input_ids, make(graph))


def test_bad_records_and_layer_ranges(tiny_adapter, make_tiny_transcoders):
    with pytest.raises(BadInputError, match="unknown intervention operation 'double'.*scale, set, add, zero"):
        Intervention(FeatureTarget(0, 0), "double", 2.0)
    with pytest.raises(BadInputError, match="finite"):
        Intervention(FeatureTarget(0, 0), "scale", float("nan"))
    with pytest.raises(BadInputError, match="not defined for error nodes"):
        Intervention(ErrorTarget(0, (1,)), "set", 1.0)
    with pytest.raises(BadInputError, match="token embedding"):
        target_from_node_id("E_651_1")
    with pytest.raises(BadInputError, match="malformed node id 'x_1'"):
        target_from_node_id("x_1")
    assert target_from_node_id("3_17_5") == FeatureTarget(3, 17, (5,))
    assert target_from_node_id("3_-1_5") == ErrorTarget(3, (5,))
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "llama")
    with pytest.raises(BadInputError, match="constrained layers 0:9"):
        run_interventions(rm, graph.input_ids, [], InterventionConfig(constrained_layers=range(0, 9)))


def test_iterative_error_zeroing_matches_a_manual_edit(tiny_adapter, make_tiny_transcoders):
    """Zeroing an error node live = replacing that MLP output by its transcoder reconstruction."""
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "gemma3", skip=True)
    layer, pos = 1, graph.n_pos - 2

    def edit(l, x, y):
        if l != layer:
            return y
        y = y.clone()
        y[0, pos] = rm.transcoders[layer](x[0, pos])
        return y

    expected = rm.model.output_logits(rm.model.edited_forward(graph.input_ids[None], edit)[0, -1])
    result = run_interventions(rm, graph.input_ids, [Intervention(ErrorTarget(layer, (pos,)), "zero")],
                               InterventionConfig(freeze_attention=False))
    assert torch.allclose(result.intervened_logits, expected, atol=1e-5)
    assert float((result.intervened_logits - result.clean_logits).abs().max()) > 1e-4


def test_open_ended_interventions_act_on_generated_positions(tiny_adapter, make_tiny_transcoders):
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "llama")
    layer = graph.n_layers - 1
    strongest = int(rm.transcoders[layer].W_dec.norm(dim=1).argmax())
    inject = [Intervention(FeatureTarget(layer, strongest, None), "add", 50.0)]
    prompt_only = run_interventions(rm, graph.input_ids, inject, InterventionConfig(generate=6))
    open_ended = run_interventions(rm, graph.input_ids, inject, InterventionConfig(generate=6, open_ended=True))
    # the first token comes from the prompt pass, identical in both; later ones see the injection too
    assert open_ended.intervened_continuation[0] == prompt_only.intervened_continuation[0]
    assert open_ended.intervened_continuation != prompt_only.intervened_continuation


def test_sampled_continuations_are_seeded(tiny_adapter, make_tiny_transcoders):
    rm, graph = _setup(tiny_adapter, make_tiny_transcoders, "qwen3")
    noop = [Intervention(FeatureTarget(*graph.feature_of(0)[:1], graph.feature_of(0)[2]), "scale", 1.0)]
    runs = [run_interventions(rm, graph.input_ids, noop, InterventionConfig(generate=8, temperature=1.5, seed=s))
            for s in (3, 3, 4)]
    assert runs[0].clean_continuation == runs[1].clean_continuation == runs[0].intervened_continuation
    assert runs[0].clean_continuation != runs[2].clean_continuation
