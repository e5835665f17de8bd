"""The ``mechscope intervene`` and ``mechscope supernodes`` contracts on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest
from test_cli import run, tiny_dirs  # noqa: F401  (module fixture)

INTERVENE_KEYS = {"clean", "intervened", "readouts", "readout_members", "interventions", "tokens", "settings"}


@pytest.fixture(scope="module")
def graph_file(tiny_dirs, tmp_path_factory):  # noqa: F811
    from mechscope.cli.main import main

    out = tmp_path_factory.mktemp("graphs")
    main(["trace", "a cat sat", "--model", str(tiny_dirs / "model"), "--transcoders", str(tiny_dirs / "tcs"),
          "--out", str(out), "--json"])
    return out / "a-cat-sat.json"


def intervene_args(tiny_dirs, graph_file, *extra):  # noqa: F811
    return ["intervene", "a cat sat", "--graph", str(graph_file), "--model", str(tiny_dirs / "model"),
            "--transcoders", str(tiny_dirs / "tcs"), *extra]


def _copy(graph_file, tmp_path):
    copy = tmp_path / "g.json"
    copy.write_text(graph_file.read_text())
    return copy


def _features(graph_file) -> list[str]:
    data = json.loads(graph_file.read_text())
    return [n["node_id"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]


def test_supernode_add_then_intervene_json_contract(tiny_dirs, graph_file, capsys, tmp_path):  # noqa: F811
    graph_file = _copy(graph_file, tmp_path)
    features = _features(graph_file)
    code, out, err = run(["supernodes", "add", str(graph_file), "group", *features[:3]], capsys)
    assert code == 0, err
    code, out, err = run(intervene_args(tiny_dirs, graph_file, "--scale", "group=-10", "--readout", "group",
                                        "--generate", "3", "--token", "a", "--json"), capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary) == INTERVENE_KEYS
    for which in ("clean", "intervened"):
        assert set(summary[which]) == {"top_tokens", "continuation"}
        assert {"token", "prob"} <= set(summary[which]["top_tokens"][0])
        assert isinstance(summary[which]["continuation"], str)
    assert summary["readouts"]["group"] == pytest.approx(-1000.0, rel=1e-4)
    members = summary["readout_members"]["group"]
    assert [m["node_id"] for m in members] == features[:3]
    assert all(m["percent"] == pytest.approx(-1000.0, rel=1e-4) for m in members)
    assert summary["interventions"][0]["operation"] == "scale" and summary["interventions"][0]["value"] == -10
    assert len(summary["interventions"][0]["members"]) == 3
    assert summary["tokens"][0]["token"] == "a"


def test_intervene_text_summary_with_injection_and_layers(tiny_dirs, graph_file, capsys):  # noqa: F811
    code, out, err = run(intervene_args(tiny_dirs, graph_file, "--inject", "1:3@2,3=5", "--layers", "0:2",
                                        "--no-freeze-attention"), capsys)
    assert code == 0, err
    assert "add 1/3@2,3 5" in out and "clean" in out and "intervened" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scale", "nosuch=2"], "unknown target 'nosuch'"),
        (["--scale", "{error}=abc"], "'abc' is not a number"),
        (["--scale", "{error}"], "expects TARGET=NUMBER"),
        (["--set", "{error}=3"], "not defined for error nodes"),
        (["--inject", "7:3@1=2"], "layer 7"),
        (["--inject", "1:3@x=2"], "positions 'x'"),
        (["--inject", "1:3@1=2", "--layers", "0:9"], "--layers '0:9'"),
        (["--inject", "1:3@1=2", "--readout", "nope"], "--readout 'nope'"),
        (["--inject", "1:3@1=2", "--token", "cat sat"], "single token"),
        ([], "no intervention given"),
    ],
    ids=["unknown-target", "non-numeric", "no-factor", "set-error", "layer-range", "bad-pos", "layers", "readout",
         "token", "nothing"],
)
def test_intervene_bad_input_exits_2(tiny_dirs, graph_file, capsys, extra, message):  # noqa: F811
    error = next(n["node_id"] for n in json.loads(graph_file.read_text())["nodes"]
                 if n["feature_type"] == "mlp reconstruction error")
    code, out, err = run(intervene_args(tiny_dirs, graph_file, *[e.format(error=error) for e in extra]), capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and message in err


def test_supernodes_suggest_accept_show_remove(graph_file, capsys, tmp_path):
    copy = _copy(graph_file, tmp_path)
    code, out, err = run(["supernodes", "suggest", str(copy), "--min-similarity", "0.3", "--json"], capsys)
    assert code == 0, err
    suggestions = json.loads(out)
    assert suggestions and not any(s["accepted"] for s in suggestions)
    assert json.loads(copy.read_text())["qParams"]["supernodes"] == []  # suggesting writes nothing
    code, out, err = run(["supernodes", "suggest", str(copy), "--min-similarity", "0.3", "--accept", "1"], capsys)
    assert code == 0 and "(written)" in out
    stored = json.loads(copy.read_text())["qParams"]["supernodes"]
    assert stored == [[suggestions[0]["label"], *suggestions[0]["node_ids"]]]
    code, out, err = run(["supernodes", "show", str(copy), "--json"], capsys)
    assert code == 0 and json.loads(out)["supernodes"] == stored
    code, out, err = run(["supernodes", "remove", str(copy), suggestions[0]["label"]], capsys)
    assert code == 0 and json.loads(copy.read_text())["qParams"]["supernodes"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["supernodes", "add", "{g}", "x", "9_9_9"], "not in the graph"),
        (["supernodes", "remove", "{g}", "nope"], "no supernode labelled 'nope'"),
        (["supernodes", "suggest", "{g}", "--accept", "99"], "no suggestion number [99]"),
        (["supernodes", "show", "{missing}"], "does not exist"),
    ],
    ids=["unknown-node", "unknown-label", "bad-accept", "missing-file"],
)
def test_supernodes_bad_input_leaves_the_file_unchanged(graph_file, capsys, tmp_path, argv, message):
    copy = _copy(graph_file, tmp_path)
    before = copy.read_text()
    code, out, err = run([a.format(g=copy, missing=tmp_path / "none.json") for a in argv], capsys)
    assert code == 2 and message in err
    assert copy.read_text() == before


def test_a_prompt_other_than_the_graphs_warns_or_is_refused(tiny_dirs, graph_file, capsys):  # noqa: F811
    node = _features(graph_file)[-1]
    common = ["--graph", str(graph_file), "--model", str(tiny_dirs / "model"), "--transcoders", str(tiny_dirs / "tcs"),
              "--zero", node, "--json"]
    code, out, err = run(["intervene", *common], capsys)  # no PROMPT: the graph's own prompt, no warning
    assert code == 0 and "warning" not in err, err
    own = json.loads(out)
    code, out, err = run(["intervene", "a cat sat", *common], capsys)
    assert code == 0 and "warning" not in err and json.loads(out)["intervened"] == own["intervened"]
    code, out, err = run(["intervene", "a dog sat", *common], capsys)  # same length, other tokens
    assert code == 0 and "warning: this prompt's tokens differ from the graph's from position 3" in err, err
    far = max(int(n.split("_")[2]) for n in _features(graph_file))
    code, _, err = run(["intervene", "a c", *common[:-3], "--zero", f"0/0@{far}"], capsys)  # too short for the target
    assert code == 2 and f"position {far}" in err and "has 4 tokens" in err, err
