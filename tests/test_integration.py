"""End to end on the embedded Gemma 3 270M with the shipped transcoder set (marked slow; runs in CI).

The first run dequantizes the GGUF model from the PyPI package into the cache (about a minute).
"""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.export.neuronpedia import validate_neuronpedia
from mechscope.transcoders.io import shipped_sets

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        "gemma-3-270m-plt-v1" not in shipped_sets(),
        reason="the shipped set gemma-3-270m-plt-v1 is not in this checkout (still training)",
    ),
]

PROMPT = "Fact: Michael Jordan plays the sport of"


@pytest.fixture(scope="module")
def replacement_model():
    from mechscope.models.loading import load_model
    from mechscope.replacement.replacement_model import ReplacementModel
    from mechscope.transcoders.io import load_transcoder_set

    torch.set_num_threads(2)
    return ReplacementModel(load_model("gemma-3-270m"), load_transcoder_set("gemma-3-270m-plt-v1"))


def test_shipped_set_reproduces_the_model(replacement_model):
    rm = replacement_model
    trace = rm.trace(rm.tokenize(PROMPT))
    logits = rm.replacement_logits(trace)
    assert torch.allclose(logits, trace.run.logits, atol=1e-3, rtol=1e-4)
    # the features explain most of each MLP output: the error's share of the output's squared norm
    # (uncentred: seven tokens are too few for a mean) is 0.04-0.55 per layer on this prompt, about
    # 0.22 on average; an untrained set leaves about all of it
    unexplained = []
    for layer in range(rm.model.n_layers):
        y, error = trace.run.mlp_outputs[layer][1:], trace.errors[layer][1:]
        unexplained.append((error.pow(2).sum() / y.pow(2).sum()).item())
        assert unexplained[-1] < 0.6, (layer, unexplained[-1])
    assert sum(unexplained) / len(unexplained) < 0.3, unexplained


def test_trace_cli_on_the_default_model(tmp_path, capsys):
    from mechscope.cli.main import main

    main(["trace", PROMPT, "--out", str(tmp_path), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["logit_targets"][0]["token"] == " basketball"
    assert summary["model"] == "google/gemma-3-270m"
    assert summary["transcoders"] == "gemma-3-270m-plt-v1"
    assert 0 < summary["replacement_score"] < 1 and 0 < summary["completeness_score"] <= 1
    assert summary["n_nodes_pruned"] < summary["n_nodes"]
    validate_neuronpedia(json.loads((tmp_path / f"{summary['slug']}.json").read_text()))


def test_suppressing_say_basketball_features_lowers_basketball(replacement_model):
    """The graph's strongest direct inputs to " basketball" are causal on the real model: -10x on
    them lowers p(" basketball"); the same features at scale 1 change nothing."""
    from mechscope.attribution.attribute import attribute
    from mechscope.interventions.intervene import InterventionConfig, run_interventions
    from mechscope.interventions.records import FeatureTarget, Intervention, SupernodeTarget

    rm = replacement_model
    graph = attribute(rm, PROMPT)
    basketball = int(graph.logit_token_ids[0])
    direct = graph.adjacency[graph.logit_offset, : graph.n_features]
    nodes = direct.argsort(descending=True)[:8].tolist()
    members = tuple(FeatureTarget(layer, feature, (pos,)) for layer, pos, feature, _ in map(graph.feature_of, nodes))
    say = SupernodeTarget("say basketball", members)
    config = InterventionConfig(freeze_attention=True)
    suppressed = run_interventions(rm, graph.input_ids, [Intervention(say, "scale", -10.0)], config,
                                   readouts={"say basketball": list(members)})
    p_clean = torch.softmax(suppressed.clean_logits, -1)[basketball]
    p_after = torch.softmax(suppressed.intervened_logits, -1)[basketball]
    assert p_clean == pytest.approx(0.611, abs=0.01)
    assert p_after < 0.5 * p_clean, (float(p_clean), float(p_after))
    # iterative patching scales each member's live activation, which upstream members already moved
    # (some down to zero)
    readout = suppressed.readouts["say basketball"]
    assert (readout.intervened <= 0).all() and readout.percent_of_clean < -100
    unchanged = run_interventions(rm, graph.input_ids, [Intervention(say, "scale", 1.0)], config)
    assert torch.allclose(unchanged.intervened_logits, unchanged.clean_logits, atol=1e-4)


@pytest.mark.skipif("gemma-3-270m-clt-v1" not in shipped_sets(), reason="the shipped CLT is not installed")
def test_shipped_clt_reproduces_the_model_and_traces_the_readme_prompt(tmp_path, capsys):
    """The shipped cross-layer set: the replacement model gives the real logits, its features explain
    most of every MLP output on the README's prompt (each layer's reconstruction sums every earlier
    layer's features), and `trace --transcoders gemma-3-270m-clt-v1` gives " basketball" with a
    valid, cross-layer graph."""
    from mechscope.cli.main import main
    from mechscope.models.loading import load_model
    from mechscope.replacement.replacement_model import ReplacementModel
    from mechscope.transcoders.io import load_transcoder_set

    rm = ReplacementModel(load_model("gemma-3-270m"), load_transcoder_set("gemma-3-270m-clt-v1"))
    assert rm.transcoders.kind == "cross-layer"
    trace = rm.trace(rm.tokenize(PROMPT))
    assert torch.allclose(rm.replacement_logits(trace), trace.run.logits, atol=1e-3, rtol=1e-4)
    unexplained = [(trace.errors[layer][1:].pow(2).sum() / trace.run.mlp_outputs[layer][1:].pow(2).sum()).item()
                   for layer in range(rm.model.n_layers)]
    assert max(unexplained) < 0.6 and sum(unexplained) / len(unexplained) < 0.3, unexplained
    main(["trace", PROMPT, "--transcoders", "gemma-3-270m-clt-v1", "--out", str(tmp_path), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["logit_targets"][0]["token"] == " basketball"
    assert summary["transcoders"] == "gemma-3-270m-clt-v1"
    graph = json.loads((tmp_path / f"{summary['slug']}.json").read_text())
    validate_neuronpedia(graph)
    assert graph["metadata"]["transcoder_kind"] == "cross-layer"
