"""One notation for a feature: every form is accepted wherever a feature is named."""

from __future__ import annotations

import json

import pytest

from mechscope.errors import BadInputError
from mechscope.features.store import parse_feature_id
from mechscope.graph.graph import FeatureNode
from mechscope.node_ids import FeatureRef, parse_feature_ref


@pytest.mark.parametrize("text, ref", [
    ("16/759", FeatureRef(16, 759, None)),
    ("16/759@8", FeatureRef(16, 759, (8,))),
    ("16/759@2,5", FeatureRef(16, 759, (2, 5))),
    ("16/759@all", FeatureRef(16, 759, None)),
    ("16_759_8", FeatureRef(16, 759, (8,))),
    ("16:759@8", FeatureRef(16, 759, (8,))),
])
def test_every_form_parses_to_the_same_feature(text, ref):
    assert parse_feature_ref(text) == ref
    assert parse_feature_id(text) == (16, 759)
    assert parse_feature_ref(str(ref)) == ref  # what is printed parses back


@pytest.mark.parametrize("bad", ["16", "16/x", "L16 #759", "16_-1_8", "E_3_4"])
def test_a_malformed_feature_names_every_form(bad):
    with pytest.raises(BadInputError) as info:
        parse_feature_ref(bad)
    assert "16/759" in str(info.value) and "16_759_8" in str(info.value)


@pytest.mark.parametrize("bad", ["16/759@", "16/759@x", "16/759@1,,x"])
def test_malformed_positions_say_what_positions_are(bad):
    with pytest.raises(BadInputError, match="positions .* must be integers .* or 'all'"):
        parse_feature_ref(bad)


def test_feature_nodes_print_forms_the_commands_accept():
    node = FeatureNode(16, 8, 759, 2.5)
    layer, pos, feature, activation = node  # still unpacks as before
    assert (layer, pos, feature, activation) == (16, 8, 759, 2.5)
    assert parse_feature_ref(node.node_id) == parse_feature_ref(node.ref) == FeatureRef(16, 759, (8,))


def test_intervene_accepts_each_form(tmp_path, capsys):
    """The same feature named three ways gives the same intervention (tiny model, in-process CLI)."""
    from conftest import make_tiny_adapter, make_tiny_transcoders
    from test_cli import run

    from mechscope.transcoders.io import save_transcoder_set

    adapter = make_tiny_adapter("llama")
    adapter.hf.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    save_transcoder_set(make_tiny_transcoders(adapter, skip=True), tmp_path / "tcs")
    common = ["--model", str(tmp_path / "model"), "--transcoders", str(tmp_path / "tcs")]
    code, out, err = run(["trace", "a cat sat", *common, "--out", str(tmp_path / "g"), "--json",
                          "--max-feature-nodes", "20"], capsys)
    assert code == 0, err
    graph = json.loads(out)["graph_path"]
    node = next(n for n in json.load(open(graph))["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, feature, pos = node["node_id"].split("_")
    results = []
    for form in (node["node_id"], f"{layer}/{feature}@{pos}"):
        code, out, err = run(["intervene", "--graph", graph, *common, "--scale", f"{form}=-10", "--json"], capsys)
        assert code == 0, err
        results.append(json.loads(out)["intervened"]["top_tokens"])
    for form in (f"{layer}/{feature}@{pos}", f"{layer}:{feature}@{pos}", f"{layer}_{feature}_{pos}"):
        code, out, err = run(["intervene", "--graph", graph, *common, "--inject", f"{form}=3", "--json"], capsys)
        assert code == 0, err
        results.append(json.loads(out)["intervened"]["top_tokens"])
    assert results[0] == results[1] and results[2] == results[3] == results[4]
    assert results[0] != results[2]
    code, _, err = run(["intervene", "--graph", graph, *common, "--inject", f"{layer}/{feature}=3"], capsys)
    assert code == 2 and "@" in err


def test_reprs_are_short_and_say_what_they_hold(tiny_adapter, make_tiny_transcoders):
    from mechscope.attribution.attribute import AttributionConfig, attribute
    from mechscope.interventions.intervene import InterventionConfig, run_interventions
    from mechscope.interventions.records import FeatureTarget, Intervention
    from mechscope.replacement.replacement_model import ReplacementModel

    adapter = tiny_adapter("llama")
    assert repr(adapter) == (f"LlamaAdapter('tiny-llama', n_layers=2, d_model=32, vocab=128, dtype=float32, "
                             f"device=cpu)") and adapter.device.type == "cpu"
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter))
    graph = attribute(rm, "a cat sat", AttributionConfig(max_feature_nodes=12))
    text = repr(graph)
    assert len(text) < 300 and "tensor" not in text
    assert f"features=12 of {len(graph.active_features)} active" in text and f"nodes={graph.n_nodes}" in text
    node = graph.feature_of(0)
    result = run_interventions(rm, graph.input_ids, [Intervention(FeatureTarget(node.layer, node.feature, (node.pos,)), "zero")],
                               InterventionConfig())
    assert "tensor" not in repr(result) and "top clean" in repr(result)
    assert result.logit_change(0) == pytest.approx(float(result.intervened_logits[0] - result.clean_logits[0]))
