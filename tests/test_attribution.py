"""The science of attribution, checked on tiny random models of every family.

- the replacement model with its error terms reproduces the model's logits;
- each feature's pre-activation equals the sum of its incoming edges plus its bias (the encoder
  bias plus the frozen model's response to the constant terms: ``b_dec`` and model biases);
- edges predict the effect of doubling a source in the frozen model (an independent forward pass);
- batched and selected-feature paths equal the plain ones.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import SLIDING_WINDOW, TINY_PROMPT

from mechscope.attribution.attribute import AttributionConfig, attribute
from mechscope.errors import BadInputError
from mechscope.graph.graph import NodeKind
from mechscope.graph.prune import partial_influences
from mechscope.replacement.replacement_model import ReplacementModel


def _frozen_sites(rm: ReplacementModel, trace, embeddings, mlp_constants):
    """Frozen forward pass (patterns and norm scales from the clean run) with MLP outputs
    ``constant + W_skip x`` (the skip path live at every position, BOS included, as in
    circuit-tracer). Returns per-layer MLP inputs and the final-norm output, each ``[pos, d_model]``.
    Written independently of FrozenReplacement."""
    inputs = {}

    def replacement(layer):
        def fn(x):
            out = mlp_constants[layer][None].clone()
            skip = rm.transcoders.skip(layer, x)
            if skip is not None:
                out = out + skip
            return out

        return fn

    final = rm.model.frozen_forward(
        trace.run.input_ids, trace.run.frozen, embeddings[None],
        [replacement(layer) for layer in range(rm.model.n_layers)],
        on_mlp_input=lambda layer, x: inputs.__setitem__(layer, x[0]),
    )
    return inputs, final[0]


def _clean_constants(rm, trace):
    """Per layer, the MLP output minus its skip path, so the frozen pass reproduces the clean run."""
    constants = []
    for layer in range(rm.model.n_layers):
        out = trace.run.mlp_outputs[layer].clone()
        skip = rm.transcoders.skip(layer, trace.run.mlp_inputs[layer])
        if skip is not None:
            out -= skip
        constants.append(out)
    return constants


@pytest.fixture(params=[False, True], ids=["no-skip", "skip"])
def skip(request):
    return request.param


def _setup(tiny_adapter, make_tiny_transcoders, family, skip=False, **kwargs):
    adapter = tiny_adapter(family)
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter, skip=skip, **kwargs))
    return rm


def test_replacement_reproduces_logits(tiny_adapter, make_tiny_transcoders, family, skip):
    check_replacement_reproduces_logits(_setup(tiny_adapter, make_tiny_transcoders, family, skip), TINY_PROMPT)


def check_replacement_reproduces_logits(rm: ReplacementModel, prompt: str) -> None:
    trace = rm.trace(rm.tokenize(prompt))
    assert len(trace.active) > 0
    assert torch.allclose(rm.replacement_logits(trace), trace.run.logits, atol=1e-4, rtol=0)
    # the errors are real: without them the logits differ
    assert float(torch.stack(trace.errors).abs().max()) > 1e-3


def test_preactivation_is_sum_of_edges_plus_bias(tiny_adapter, make_tiny_transcoders, family, skip):
    check_preactivation_is_sum_of_edges_plus_bias(_setup(tiny_adapter, make_tiny_transcoders, family, skip), TINY_PROMPT)


def check_preactivation_is_sum_of_edges_plus_bias(rm: ReplacementModel, prompt: str) -> None:
    graph = attribute(rm, prompt, AttributionConfig(max_feature_nodes=None, batch_size=16))
    trace = rm.trace(graph.input_ids)
    assert graph.n_features == len(trace.active)
    # the constant part of the frozen model: every source zeroed, b_dec kept, and at BOS (no nodes)
    # the clean MLP output minus its skip path
    constants = []
    clean = _clean_constants(rm, trace)
    n_layers, d_model = rm.model.n_layers, rm.model.d_model
    zero_acts = [torch.zeros(trace.n_pos, rm.transcoders.d_transcoder(layer)) for layer in range(n_layers)]
    b_dec = rm.transcoders.reconstruct(zero_acts, [torch.zeros(trace.n_pos, d_model)] * n_layers)  # biases only
    for layer in range(n_layers):
        c = b_dec[layer].clone()
        c[: trace.first_pos] = clean[layer][: trace.first_pos]
        constants.append(c)
    zero_inputs, _ = _frozen_sites(rm, trace, torch.zeros_like(trace.run.embeddings), constants)
    checked = 0
    for node in range(graph.n_features):
        layer, pos, feature, activation = graph.feature_of(node)
        pre = rm.transcoders.pre_activations(layer, trace.run.mlp_inputs[layer][pos])[feature]
        f = torch.tensor([feature])
        bias = rm.transcoders.encoder_bias(layer, f)[0] + rm.transcoders.encoder_vectors(layer, f)[0] @ zero_inputs[layer][pos]
        total = graph.adjacency[node].sum() + bias
        assert torch.allclose(total, pre, atol=1e-4, rtol=1e-4), (node, float(total), float(pre))
        assert activation == pytest.approx(float(pre), rel=1e-5)
        checked += 1
    assert checked > 10


def test_edges_sum_to_preactivations_and_predict_doubling_where_patterns_are_banded(tiny_adapter, make_tiny_transcoders,
                                                                                   family, monkeypatch):
    """On a prompt longer than one block (models.attention.band_block) the frozen patterns are
    multiplied banded (causal layers and Gemma's sliding-window layers; banding starts at
    MIN_BANDED_QUERIES, set to 0 for this short prompt); edges still sum to every
    pre-activation of the real model and predict doubling a source."""
    import mechscope.models.attention as attention
    from mechscope.models.attention import band_block

    monkeypatch.setattr(attention, "MIN_BANDED_QUERIES", 0)
    rm = _setup(tiny_adapter, make_tiny_transcoders, family, True)
    prompt = "the dog ran far away, the cat sat"
    assert len(rm.tokenize(prompt)) > band_block(len(rm.tokenize(prompt)), SLIDING_WINDOW)
    check_preactivation_is_sum_of_edges_plus_bias(rm, prompt)
    check_edges_predict_doubling_a_source(rm, prompt)


def _target_value(rm, graph, node, inputs, final):
    kind = graph.node_kind(node)
    if kind == NodeKind.FEATURE:
        layer, pos, feature, _ = graph.feature_of(node)
        return rm.transcoders.pre_activations(layer, inputs[layer][pos])[feature]
    k = node - graph.logit_offset
    W_U = rm.model.W_U
    vector = W_U[graph.logit_token_ids[k]] - W_U.mean(0)
    return vector @ final[-1]


def test_edges_predict_doubling_a_source(tiny_adapter, make_tiny_transcoders, family, skip):
    check_edges_predict_doubling_a_source(_setup(tiny_adapter, make_tiny_transcoders, family, skip), TINY_PROMPT)


def check_edges_predict_doubling_a_source(rm: ReplacementModel, prompt: str) -> None:
    graph = attribute(rm, prompt, AttributionConfig(max_feature_nodes=None, batch_size=32))
    trace = rm.trace(graph.input_ids)
    constants = _clean_constants(rm, trace)
    base_inputs, base_final = _frozen_sites(rm, trace, trace.run.embeddings, constants)
    gen = torch.Generator().manual_seed(0)
    feature_sources = torch.randperm(graph.n_features, generator=gen)[:6].tolist()
    error_sources = [graph.error_offset + graph.n_pos * layer + trace.first_pos + 1 for layer in range(graph.n_layers)]
    token_sources = [graph.token_offset + p for p in range(graph.n_pos)]
    targets = list(range(graph.logit_offset, graph.n_nodes)) + torch.randperm(graph.n_features, generator=gen)[:20].tolist()
    compared = 0
    for source in feature_sources + error_sources[:2] + token_sources[-3:]:
        embeddings = trace.run.embeddings.clone()
        doubled = [c.clone() for c in constants]
        kind = graph.node_kind(source)
        if kind == NodeKind.FEATURE:
            layer, pos, feature, activation = graph.feature_of(source)
            decoder = rm.transcoders.decoder_vectors(layer, torch.tensor([feature]))[0]  # (n_out, d_model)
            for j, out_layer in enumerate(rm.transcoders.output_layers(layer)):
                doubled[out_layer][pos] += activation * decoder[j]
        elif kind == NodeKind.ERROR:
            layer, pos = graph.error_of(source)
            doubled[layer][pos] += trace.errors[layer][pos]
        else:
            embeddings[source - graph.token_offset] *= 2
        inputs, final = _frozen_sites(rm, trace, embeddings, doubled)
        for target in targets:
            effect = _target_value(rm, graph, target, inputs, final) - _target_value(rm, graph, target, base_inputs, base_final)
            edge = graph.adjacency[target, source]
            scale = max(float(edge.abs()), float(effect.abs()), 1e-3)
            assert abs(float(effect - edge)) <= 1e-3 * scale + 1e-6, (source, target, float(effect), float(edge))
            compared += int(float(edge.abs()) > 1e-4)
    assert compared > 20  # the check saw real, non-zero edges


def test_batch_size_and_feature_selection_do_not_change_edges(tiny_adapter, make_tiny_transcoders):
    rm = _setup(tiny_adapter, make_tiny_transcoders, "gemma3", skip=True)
    full = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=64))
    small_batches = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=5))
    assert torch.allclose(full.adjacency, small_batches.adjacency, atol=1e-5, rtol=1e-5)
    n = 20
    partial = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=n, batch_size=7))
    assert partial.n_features == n
    # the selected features' rows and the logit rows are the full graph's, on the kept columns
    columns = torch.cat([partial.selected_features, torch.arange(full.n_features, full.n_nodes - full.n_logits)])
    rows = torch.cat([partial.selected_features, torch.arange(full.n_nodes - full.n_logits, full.n_nodes)])
    partial_rows = torch.cat([torch.arange(n), torch.arange(partial.n_nodes - partial.n_logits, partial.n_nodes)])
    assert torch.allclose(partial.adjacency[partial_rows][:, : len(columns)], full.adjacency[rows][:, columns], atol=1e-5)
    # they are the most influential ones, not the first ones
    assert not torch.equal(partial.selected_features, torch.arange(n))


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_prefix_backward_passes_give_the_whole_prompts_edges(tiny_adapter, make_tiny_transcoders, family):
    """Back-propagating a batch through the frozen model of the shortest prefix of whole blocks that
    holds its targets (attention is causal) gives the edges of the whole-prompt backward pass."""
    rm = _setup(tiny_adapter, make_tiny_transcoders, family, skip=True)
    prompt = "a cat sat on the mat and the dog ran far away"
    whole = attribute(rm, prompt, AttributionConfig(max_feature_nodes=None, batch_size=16, prefix_blocks=1))
    for blocks in (3, 8):
        blocked = attribute(rm, prompt, AttributionConfig(max_feature_nodes=None, batch_size=16, prefix_blocks=blocks))
        assert torch.equal(blocked.selected_features, whole.selected_features)
        assert float((blocked.adjacency - whole.adjacency).abs().max()) <= 1e-5 * float(whole.adjacency.abs().max())
    selected = attribute(rm, prompt, AttributionConfig(max_feature_nodes=40, batch_size=8, prefix_blocks=4))
    reference = attribute(rm, prompt, AttributionConfig(max_feature_nodes=40, batch_size=8, prefix_blocks=1))
    assert torch.equal(selected.selected_features, reference.selected_features)
    assert torch.allclose(selected.adjacency, reference.adjacency, atol=1e-5 * float(reference.adjacency.abs().max()))
    with pytest.raises(BadInputError, match="prefix_blocks"):
        AttributionConfig(prefix_blocks=0)


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_grouped_backward_passes_equal_one_target_at_a_time(tiny_adapter, make_tiny_transcoders, family):
    """Queues are cut into groups with a tight span of layers and positions (plan_groups) and rows
    are stored over that span only; the graph equals back-propagating every target alone through
    the whole prompt."""
    rm = _setup(tiny_adapter, make_tiny_transcoders, family, skip=True)
    prompt = "a cat sat on the mat and the dog ran far away"
    alone = attribute(rm, prompt, AttributionConfig(max_feature_nodes=None, batch_size=1, prefix_blocks=1))
    grouped = attribute(rm, prompt, AttributionConfig(max_feature_nodes=None, batch_size=16, prefix_blocks=4))
    assert torch.equal(grouped.selected_features, alone.selected_features)
    assert float((grouped.adjacency - alone.adjacency).abs().max()) <= 1e-5 * float(alone.adjacency.abs().max())
    assert grouped.config["edge_rows_mb"] < alone.config["edge_rows_mb"]  # later columns of early targets not stored


def test_banded_sliding_window_attention_gives_the_dense_graph(tiny_adapter, make_tiny_transcoders, monkeypatch):
    """Frozen patterns are replayed banded (models.attention.banded_matmul: causal layers skip the
    upper triangle, sliding-window layers everything outside their window) once a prefix is longer
    than one block (from MIN_BANDED_QUERIES queries, set to 0 for this short prompt; at its default
    the prompt is multiplied densely); the graph equals the one the dense products give."""
    import mechscope.models.attention as attention

    monkeypatch.setattr(attention, "MIN_BANDED_QUERIES", 0)

    rm = _setup(tiny_adapter, make_tiny_transcoders, "gemma3", skip=True)
    prompt = "a cat sat on the mat and the dog ran far away"
    widths, band_width = [], attention.band_width
    monkeypatch.setattr(attention, "band_width", lambda pattern: widths.append(band_width(pattern)) or widths[-1])
    config = AttributionConfig(max_feature_nodes=None, batch_size=16, prefix_blocks=4)
    banded = attribute(rm, prompt, config)
    assert SLIDING_WINDOW in widths and max(w or 0 for w in widths) > SLIDING_WINDOW  # sliding and causal layers banded
    monkeypatch.setattr(attention, "MIN_BANDED_QUERIES", len(rm.tokenize(prompt)) + 1)
    widths.clear()
    dense = attribute(rm, prompt, config)
    assert widths == []  # below MIN_BANDED_QUERIES nothing is banded
    assert torch.equal(banded.selected_features, dense.selected_features)
    assert float((banded.adjacency - dense.adjacency).abs().max()) <= 1e-5 * float(dense.adjacency.abs().max())


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_float16_edge_rows_past_the_budget_give_the_graph_to_their_rounding(tiny_adapter, make_tiny_transcoders, family):
    """A prompt whose rows outgrow the budget keeps them in float16: the graph says so, selects
    the same features here (no near-ties), and its edges are the float32 graph's to 11-bit rounding."""
    rm = _setup(tiny_adapter, make_tiny_transcoders, family, skip=True)
    prompt = "a cat sat on the mat and the dog ran far away"
    config = AttributionConfig(max_feature_nodes=40, batch_size=8)
    exact = attribute(rm, prompt, config)
    compact = attribute(rm, prompt, replace(config, edge_rows_gb=1e-9))
    assert exact.config["edge_rows_dtype"] == "float32" and compact.config["edge_rows_dtype"] == "float16"
    assert torch.equal(compact.selected_features, exact.selected_features)
    diff = float((compact.adjacency - exact.adjacency).abs().max())
    assert 0 < diff <= 2**-11 * float(exact.adjacency.abs().max())
    assert compact.config["edge_rows_mb"] < exact.config["edge_rows_mb"]
    with pytest.raises(BadInputError, match="edge_rows_gb"):
        AttributionConfig(edge_rows_gb=0)


def test_plan_groups_is_the_cheapest_cut_of_the_queue():
    """The dynamic programme returns consecutive groups of at most ``max_group`` covering the queue,
    and no other cut of the queue into consecutive groups is cheaper (checked by enumeration)."""
    import itertools

    from mechscope.attribution.attribute import plan_groups

    gen = torch.Generator().manual_seed(3)
    layers = torch.randint(0, 5, (9,), generator=gen).sort().values
    positions = torch.randint(0, 40, (9,), generator=gen)
    order = torch.argsort(layers * 100 + positions)
    layers, positions = layers[order], positions[order]
    length = lambda p: min(40, -(-(p + 1) // 8) * 8)  # noqa: E731

    def cost(groups):
        return sum((int(layers[g].max()) + 1) * ((len(g) + 0.7) * length(int(positions[g].max())) + 48) + 100
                   for g in groups)

    groups = plan_groups(layers, positions, length, max_group=4, group_units=100)
    assert torch.equal(torch.cat(groups), torch.arange(9)) and max(map(len, groups)) <= 4
    best = float("inf")
    for cuts in itertools.product([0, 1], repeat=8):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [9]
        candidate = [torch.arange(a, b) for a, b in zip(bounds, bounds[1:])]
        if max(map(len, candidate)) <= 4:
            best = min(best, cost(candidate))
    assert cost(groups) == pytest.approx(best)
    assert len(plan_groups(layers, positions, length, max_group=1)) == 9


def test_feature_selection_replays_circuit_tracers_dense_algorithm(tiny_adapter, make_tiny_transcoders):
    """Visiting order by partial influence, replayed naively on dense rows of the full graph:
    logit rows first, then the ``update_interval * batch_size`` most influential unvisited features,
    re-ranked from all rows so far (circuit-tracer ``attribute``, phase 4)."""
    rm = _setup(tiny_adapter, make_tiny_transcoders, "gemma3", skip=True)
    full = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=64))
    n, batch, interval = 30, 4, 2
    partial = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=n, batch_size=batch, update_interval=interval))
    n_active, n_other = full.n_features, full.n_errors + full.n_pos
    dense = torch.cat([full.adjacency[full.logit_offset :], full.adjacency[: full.n_features]])[:, : n_active + n_other]
    node_of_row = torch.cat([torch.arange(full.n_logits) + n_active + n_other, torch.arange(n_active)])
    rows, visited = list(range(full.n_logits)), torch.zeros(n_active, dtype=torch.bool)
    while int(visited.sum()) < n:
        influence = partial_influences(dense[rows], full.logit_probabilities, node_of_row[rows])[:n_active]
        rank = influence.argsort(descending=True)
        pending = rank[~visited[rank]][: min(interval * batch, n - int(visited.sum()))]
        visited[pending] = True
        rows += [full.n_logits + int(i) for i in pending]  # row of feature i in `dense`
    assert torch.equal(partial.selected_features, visited.nonzero().flatten())


def test_bfloat16_model_gives_a_close_graph(make_tiny_transcoders):
    """``--dtype bfloat16``: the model and its frozen backward in bfloat16 give the same nodes and
    edges within bfloat16 precision (not exact: the float32 path is the reference)."""
    from conftest import make_tiny_adapter

    adapter = make_tiny_adapter("gemma3")
    tcs = make_tiny_transcoders(adapter, skip=True)
    config = AttributionConfig(max_feature_nodes=None, batch_size=16, targets=("t", "a"))  # top tokens are near ties
    exact = attribute(ReplacementModel(adapter, tcs), TINY_PROMPT, config)
    adapter.hf.to(torch.bfloat16)
    half = attribute(ReplacementModel(adapter, tcs), TINY_PROMPT, config)
    assert half.config["dtype"] == "bfloat16" and exact.config["dtype"] == "float32"
    exact_set = {tuple(f) for f in exact.active_features.tolist()}
    common = exact_set & {tuple(f) for f in half.active_features.tolist()}
    assert len(common) >= 0.9 * len(exact_set)  # a few features cross their thresholds in bfloat16
    # token -> logit edges do not depend on which features are active: compare them directly
    def token_to_logit(graph):
        return graph.adjacency[graph.logit_offset :, graph.token_offset : graph.logit_offset]

    relative = float((token_to_logit(half) - token_to_logit(exact)).abs().max() / token_to_logit(exact).abs().max())
    assert 0 < relative < 0.05


def test_logit_targets(tiny_adapter, make_tiny_transcoders):
    rm = _setup(tiny_adapter, make_tiny_transcoders, "llama")
    graph = attribute(rm, TINY_PROMPT, AttributionConfig(max_n_logits=3, desired_logit_prob=0.999, max_feature_nodes=8))
    probs = torch.softmax(rm.model.clean_run(graph.input_ids).logits, -1)
    assert graph.n_logits == 3
    assert torch.equal(graph.logit_token_ids, probs.topk(3).indices)
    named = attribute(rm, TINY_PROMPT, AttributionConfig(targets=("t",), max_feature_nodes=8))
    assert named.logit_tokens == ["t"]


def test_a_logit_difference_target_has_the_difference_of_the_two_tokens_edges(tiny_adapter, make_tiny_transcoders):
    """``--logit-diff A B``: one target node; every edge into it equals the edge into A minus the edge
    into B (all features kept, so the node sets match)."""
    rm = _setup(tiny_adapter, make_tiny_transcoders, "qwen2", skip=True)
    kept = dict(max_feature_nodes=None, batch_size=32)
    diff = attribute(rm, TINY_PROMPT, AttributionConfig(logit_diff=("t", "e"), **kept))
    a = attribute(rm, TINY_PROMPT, AttributionConfig(targets=("t",), **kept))
    b = attribute(rm, TINY_PROMPT, AttributionConfig(targets=("e",), **kept))
    assert diff.n_logits == 1 and diff.logit_tokens == ["t - e"] and int(diff.logit_token_ids[0]) == int(a.logit_token_ids[0])
    assert torch.equal(diff.active_features, a.active_features) and torch.equal(diff.selected_features, a.selected_features)
    row = diff.logit_offset
    expected = a.adjacency[a.logit_offset] - b.adjacency[b.logit_offset]
    torch.testing.assert_close(diff.adjacency[row], expected, atol=1e-5, rtol=1e-5)
    assert float(expected.abs().max()) > 1e-3
    from mechscope.errors import BadInputError

    with pytest.raises(BadInputError, match="not a single token"):
        attribute(rm, TINY_PROMPT, AttributionConfig(logit_diff=("t", "ab"), **kept))
    with pytest.raises(BadInputError, match="leave out --target"):
        AttributionConfig(logit_diff=("t", "e"), targets=("t",))
