"""Graph diffs on constructed graphs: token alignment with an inserted and a substituted token,
features matched by (layer, index) at aligned positions, features in one graph only, the diff graph
JSON validates and opens as a graph, bad input exits 2."""

from __future__ import annotations

import copy
import json

import pytest
from explorer_fixtures import PROMPT_TOKENS, make_graph_json
from test_cli import run

from mechscope.errors import BadInputError
from mechscope.export.schema import validate_neuronpedia
from mechscope.graph.diff import align_positions, diff_graph_json, diff_graphs


def test_alignment_pairs_substitutions_and_leaves_insertions_unaligned():
    a = ["<bos>", "How", " do", " I", " make", " a", " bomb", "?"]
    b = ["<bos>", "How", " do", " I", " detect", " a", " big", " bomb", "?"]
    columns = align_positions(a, b)
    assert columns == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (None, 6), (6, 7), (7, 8)]
    assert align_positions(a, a) == [(i, i) for i in range(len(a))]
    # a word split into more tokens lines up by its last token
    assert align_positions(["Michael", " Jordan", " plays"], ["Michael", " Bat", "kin", " plays"]) == [
        (0, 0), (None, 1), (1, 2), (2, 3)]
    # a replaced stretch of unequal length pairs from its end; the first extra token stays alone
    assert align_positions(["The", " capital", " of"], ["The", " great", " city", " of"]) == [(0, 0), (None, 1), (1, 2), (2, 3)]


def _shifted(data: dict) -> dict:
    """B: the fixture graph with " capital" replaced by " city" and a token " great" inserted before it;
    every position from 2 on moves by one; feature 1/9 is gone from " capital" and new at the last position;
    feature 0_5 at " Texas" fires twice as strongly."""
    b = copy.deepcopy(data)
    tokens = ["<bos>", "The", " great", " city", " of", " Texas", " is"]
    b["metadata"]["prompt_tokens"] = tokens
    b["metadata"]["prompt"] = "".join(tokens[1:])
    b["metadata"]["slug"] = "b"
    moved = {}
    for node in b["nodes"]:
        old = node["node_id"]
        if node["ctx_idx"] >= 2:
            node["ctx_idx"] += 1
        head, _, _ = old.rpartition("_")
        node["node_id"] = f"{head}_{node['ctx_idx']}"
        moved[old] = node["node_id"]
        if old == "0_5_4":
            node["activation"], node["total_effect"] = 5.0, 1.5
    b["nodes"] = [n for n in b["nodes"] if not n["node_id"].startswith("1_9_")]
    b["nodes"].append({**next(n for n in b["nodes"] if n["node_id"] == "2_4_6"), "node_id": "1_9_6", "layer": "1",
                       "activation": 1.0, "total_effect": -0.9, "clerp": "new"})
    kept = {n["node_id"] for n in b["nodes"]}
    b["links"] = [{**l, "source": moved[l["source"]], "target": moved[l["target"]]} for l in b["links"]
                  if moved[l["source"]] in kept and moved[l["target"]] in kept]
    b["links"].append({"source": "1_9_6", "target": moved["4_7_5"], "weight": 0.7})
    return b


def test_diff_matches_features_at_aligned_positions():
    a = make_graph_json("a")
    a["metadata"]["model_id"] = "m"
    b = _shifted(a)
    result = diff_graphs(a, b)
    assert (None, 2) in result.columns and (2, 3) in result.columns  # " great" inserted, " capital" -> " city"
    texas = next(r for r in result.changed if r.ref == "0/5@4")
    assert (texas.pos_a, texas.pos_b, texas.activation_a, texas.activation_b) == (4, 5, 2.5, 5.0)
    assert result.changed[0].ref == "0/5@4"  # the largest change comes first
    assert [r.ref for r in result.only_a] == ["1/9@2"] and result.only_a[0].token == " capital |  city"
    assert [r.ref for r in result.only_b] == ["1/9@6"] and result.only_b[0].effect_b == -0.9
    assert len(result.changed) == 4 and 0 <= result.error_share_a <= 1
    data = result.as_dict(top=2)
    assert len(data["changed"]) == 2 and data["only_b"][0]["feature"] == "1/9"


def test_the_diff_graph_json_validates_and_marks_each_node(tmp_path):
    a = make_graph_json("a")
    b = _shifted(a)
    merged = diff_graph_json(a, b)
    validate_neuronpedia(merged)
    assert merged["metadata"]["prompt_tokens"] == ["<bos>", "The", " great", " capital |  city", " of", " Texas", " is"]
    assert merged["metadata"]["diff"]["edge_weights"] == "B - A"
    sides = {n["node_id"]: n["diff_side"] for n in merged["nodes"]}
    assert sides["0_5_5"] == "both" and sides["1_9_3"] == "a" and sides["1_9_6"] == "b"
    texas = next(n for n in merged["nodes"] if n["node_id"] == "0_5_5")
    assert (texas["activation_a"], texas["activation_b"]) == (2.5, 5.0)
    ids = {n["node_id"] for n in merged["nodes"]}
    assert all(l["source"] in ids and l["target"] in ids for l in merged["links"])
    weight = {(l["source"], l["target"]): l["weight"] for l in merged["links"]}
    assert weight[("1_9_6", "4_7_6")] == pytest.approx(0.7)  # only in B: +weight
    assert weight[("E_102_3", "1_9_3")] == pytest.approx(-0.4)  # only in A: -weight
    assert ("0_5_5", "1_7_5") not in weight  # the same in both: no difference


def test_diff_cli_and_bad_input(tmp_path, capsys):
    a = make_graph_json("a")
    b = _shifted(a)
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    code, out, err = run(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "d.json")],
                         capsys)
    assert code == 0, err
    assert "only in A: 1" in out and "only in B: 1" in out and "0/5@4" in out
    validate_neuronpedia(json.loads((tmp_path / "d.json").read_text()))
    code, out, _ = run(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"], capsys)
    assert set(json.loads(out)) >= {"alignment", "changed", "only_a", "only_b", "supernodes"}
    b["metadata"]["scan"] = "other-set"
    (tmp_path / "c.json").write_text(json.dumps(b))
    code, _, err = run(["diff", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "e.json")],
                       capsys)
    assert code == 2 and "different transcoder sets" in err and not (tmp_path / "e.json").exists()
    with pytest.raises(BadInputError):
        diff_graphs(a, b)


def test_graphs_of_different_targets_are_compared_with_a_warning(tmp_path, capsys):
    a = make_graph_json("a")
    b = _shifted(a)
    b["metadata"]["effects_target"] = " Dallas"
    result = diff_graphs(a, b)
    assert result.warnings and "' Austin'" in result.warnings[0] and "' Dallas'" in result.warnings[0]
    assert diff_graphs(a, _shifted(a)).warnings == []
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    code, _, err = run(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")], capsys)
    assert code == 0 and "warning: the graphs explain different targets" in err


def test_a_logit_difference_target_is_not_merged_with_a_plain_logit_of_the_same_token():
    a = make_graph_json("a")
    b = _shifted(a)
    for node in b["nodes"]:
        if node["node_id"] == "4_7_6":
            node["clerp"] = 'Logit difference " Austin" - " Dallas"'
    merged = diff_graph_json(a, b)
    validate_neuronpedia(merged)
    logits = {n["node_id"]: n["clerp"] for n in merged["nodes"] if n["feature_type"] == "logit"}
    assert logits["4_7_6"].startswith('Output " Austin"') and logits["4_7_6_b"].startswith("Logit difference")
