"""The feature store on a tiny model, built from a per-layer set and from a cross-layer transcoder:
maxima and top contexts equal a brute-force pass of the set's encoder; resume; reader; probe,
dashboards and the explorer's cards on the same store."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SET_KINDS, make_tiny_adapter, make_tiny_set
from test_cli import SET_DIRS, tiny_dirs  # noqa: F401  (module fixture)
from test_training import CTX_LEN, write_sources

from mechscope.data.corpus import CorpusConfig, TokenStream, build_corpus
from mechscope.errors import BadInputError
from mechscope.features import build
from mechscope.features.store import FeatureStore, parse_feature_id
from mechscope.replacement.replacement_model import ReplacementModel

N_TOKENS = 40 * (CTX_LEN - 1)
QUANTILE_SEQUENCES = 20
BUILD = dict(batch_sequences=6, top_k=4, window=8, n_logit_tokens=3, quantile_tokens=QUANTILE_SEQUENCES * (CTX_LEN - 1),
             n_intervals=4, per_interval=3, progress=False)


@pytest.fixture(scope="module", params=SET_KINDS)
def setup(request, tmp_path_factory):
    """``(rm, stream, store path, root)``: a store built from the llama's set of each kind, the set
    ``tiny_dirs`` saves in ``SET_DIRS[kind]``."""
    root = tmp_path_factory.mktemp("store")
    txt, jsonl, _ = write_sources(root / "raw")
    corpus = build_corpus(CorpusConfig(sources=(str(txt), str(jsonl))), out=root / "corpus")
    adapter = make_tiny_adapter("llama")
    rm = ReplacementModel(adapter, make_tiny_set(adapter, request.param, skip=True))
    stream = TokenStream(corpus, adapter.tokenizer, CTX_LEN, seed=5)
    path = build.build_feature_store(rm, stream, N_TOKENS, root / "store.sqlite", root / "ckpt", **BUILD)
    return rm, stream, path, root


def _set_dir(tiny_dirs, rm) -> str:
    """The saved copy of ``rm``'s set in ``tiny_dirs``, for the command line."""
    return str(tiny_dirs / SET_DIRS[rm.transcoders.kind])


def _brute_force(rm, stream, n_sequences):
    ids = torch.as_tensor(np.stack([stream.sequence(i) for i in range(n_sequences)]))
    inputs, _ = rm.model.run_with_mlp_sites(ids)
    return ids, [rm.transcoders.encode(layer, x.float())[:, 1:] for layer, x in enumerate(inputs)]


def test_store_matches_brute_force(setup):
    from mechscope.features.dense import logit_effects

    rm, stream, path, _ = setup
    store = FeatureStore(path)
    assert store.meta["n_tokens"] == N_TOKENS and store.meta["quantile_tokens"] == QUANTILE_SEQUENCES * (CTX_LEN - 1)
    ids, acts = _brute_force(rm, stream, 40)
    decode = rm.model.tokenizer.decode
    checked = 0
    for layer in range(rm.model.n_layers):
        effects = logit_effects(rm.model, rm.transcoders, layer, torch.arange(rm.transcoders.d_transcoder(layer)))
        for feature in range(0, rm.transcoders.d_transcoder(layer), 5):
            a = acts[layer][:, :, feature]
            dash = store.feature(layer, feature)
            assert dash.max_value == pytest.approx(float(a.max()), rel=1e-5)
            assert dash.density == pytest.approx(float((a > 0).float().mean()))
            assert sum(dash.hist) == dash.active == int((a > 0).sum())
            per_seq = a.amax(1)
            expected = per_seq.topk(4)
            # the 4 distinct sequences with the highest maxima (ties between identical windows in any order)
            assert [e.value for e in dash.top] == pytest.approx([float(v) for v in expected.values if v > 0])
            assert len({e.sequence for e in dash.top}) == len(dash.top)
            assert all(float(per_seq[e.sequence]) == pytest.approx(e.value) for e in dash.top)
            for e in dash.top + [x for q in dash.quantiles for x in q.examples]:
                window = torch.arange(e.start, e.start + 8)
                assert e.tokens == [decode([int(t)]) for t in ids[e.sequence, window]]
                assert e.acts == pytest.approx(a[e.sequence, window - 1].half().float().tolist())
                assert e.value == pytest.approx(float(a[e.sequence, e.position - 1])), (e.acts, e.value, e.position, e.start)
                assert e.acts[e.center] == pytest.approx(e.value, rel=1e-3)
            # quantile examples: min(3, n) distinct tokens of the first 20 sequences in each interval
            prefix = a[:QUANTILE_SEQUENCES]
            for interval in dash.quantiles:
                inside = (prefix > interval.low) & (prefix <= interval.high * (1 + 1e-6))
                assert len(interval.examples) == min(3, int(inside.sum())), (layer, feature, interval.index)
                assert len({(e.sequence, e.position) for e in interval.examples}) == len(interval.examples)
                assert all(e.sequence < QUANTILE_SEQUENCES and inside[e.sequence, e.position - 1]
                           for e in interval.examples)
            n_sampled = sum(len(q.examples) for q in dash.quantiles)
            assert n_sampled == sum(min(3, int(((prefix > dash.max_value * q / 4) & (prefix <= dash.max_value * (q + 1) / 4)
                                                 ).sum())) for q in range(4)) or dash.max_value == 0
            assert len(dash.pos_tokens) == len(dash.neg_tokens) == 3
            assert dash.pos_tokens[0][1] >= dash.pos_tokens[-1][1] >= dash.neg_tokens[-1][1] >= dash.neg_tokens[0][1]
            assert [v for _, v in dash.pos_tokens] == pytest.approx(effects[feature].topk(3).values.tolist(), abs=1e-4)
            checked += bool(dash.top)
    assert checked > 10


def test_interrupted_build_resumes_to_the_same_store(setup, monkeypatch):
    rm, stream, path, root = setup
    original = build._save
    calls = []

    def save_then_stop(path, stats, quantiles, state):
        original(path, stats, quantiles, state)
        calls.append(state["phase"])
        if (state["phase"], state["next_sequence"]) != ("quantiles", QUANTILE_SEQUENCES):
            raise KeyboardInterrupt

    monkeypatch.setattr(build, "_save", save_then_stop)
    while True:  # killed after every checkpoint: each run resumes and gets one batch further, in both passes
        try:
            again = build.build_feature_store(rm, stream, N_TOKENS, root / "again.sqlite", root / "ckpt2",
                                              checkpoint_every_s=0.0, **BUILD)
            break
        except KeyboardInterrupt:
            assert len(calls) < 30
    assert calls.count("top") == 40 // 6 + 1 and calls.count("quantiles") > 20 // 6  # killed in both passes
    a, b = FeatureStore(path), FeatureStore(again)
    for layer, feature in [(0, 0), (1, 7), (1, 20)]:
        x, y = a.feature(layer, feature), b.feature(layer, feature)
        assert (x.max_value, x.hist, [e.sequence for e in x.top]) == (y.max_value, y.hist, [e.sequence for e in y.top])
        assert [[(e.sequence, e.position) for e in q.examples] for q in x.quantiles] == \
            [[(e.sequence, e.position) for e in q.examples] for q in y.quantiles]


def test_labels_bad_ids_and_reader_without_torch(setup, tmp_path):
    _, _, path, _ = setup
    store = FeatureStore(path)
    store.set_label(1, 3, "cat-ish")
    assert FeatureStore(path).labels() == {"1/3": "cat-ish"}
    assert len(store.densest(5)) == 5
    with pytest.raises(BadInputError, match="feature 9/0 is not in the store; layers 0..1"):
        store.feature(9, 0)
    with pytest.raises(BadInputError, match="LAYER/FEATURE"):
        parse_feature_id("12-3")
    with pytest.raises(BadInputError, match="no feature store"):
        FeatureStore(tmp_path / "none.sqlite")
    with pytest.raises(BadInputError, match="--tokens must be >= 1"):
        build.build_feature_store(*setup[:2], 0, tmp_path / "s", tmp_path / "c")
    code = ("import sys; from mechscope.features.store import FeatureStore; "
            f"FeatureStore({str(path)!r}).feature(0, 0); sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_features_cli_show_and_label(setup, capsys):
    from test_cli import run

    _, _, path, _ = setup
    code, out, err = run(["features", "show", "1/3", "--store", str(path), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["layer"] == 1 and data["feature"] == 3 and {"top", "pos_tokens", "density"} <= set(data)
    code, out, err = run(["features", "label", "1/4", "a label", "--store", str(path)], capsys)
    assert code == 0 and FeatureStore(path).labels()["1/4"] == "a label"
    code, out, err = run(["features", "show", "1/4", "--store", str(path)], capsys)
    assert code == 0 and '"a label"' in out and "top activations" in out
    for argv, message in ((["features", "show", "1-4", "--store", str(path)], "LAYER/FEATURE"),
                          (["features", "show", "7/0", "--store", str(path)], "not in the store"),
                          (["features", "show", "1/4", "--store", str(path) + ".none"], "no feature store"),
                          (["features", "build", "--tokens", "0"], "--tokens must be >= 1")):
        code, out, err = run(argv, capsys)
        assert code == 2 and message in err, (argv, err)


def test_probe_percentages_are_exact_against_the_store(setup, tiny_dirs, capsys):  # noqa: F811
    from test_cli import run

    from mechscope.features.probe import probe_feature

    rm, _, path, _ = setup
    store = FeatureStore(path)
    layer, feature = max(((lay, f) for lay in range(2) for f in range(rm.transcoders.d_transcoder(lay))),
                         key=lambda k: store.feature(*k).density)
    dash_max = store.feature(layer, feature).max_value
    prompts = ["a cat sat on the mat", "the dog ran far away"]
    results = probe_feature(rm, layer, feature, prompts, dash_max)
    for prompt, result in zip(prompts, results):
        ids = rm.tokenize(prompt)
        inputs, _ = rm.model.run_with_mlp_sites(ids[None])
        acts = rm.transcoders.encode(layer, inputs[layer][0].float())[1:, feature]
        assert result.max_activation == pytest.approx(float(acts.max()))
        assert result.percent_of_max == pytest.approx(100 * float(acts.max()) / dash_max)
        assert result.position == int(acts.argmax()) + 1
    assert any(r.max_activation > 0 for r in results)
    argv = ["probe", f"{layer}/{feature}", *prompts, "--store", str(path), "--model", str(tiny_dirs / "model"),
            "--transcoders", _set_dir(tiny_dirs, rm), "--json"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [set(r) for r in rows] == [{"prompt", "max_activation", "percent_of_max", "token", "position", "active",
                                       "pre_activation"}] * 2
    assert [r["percent_of_max"] for r in rows] == pytest.approx([r.percent_of_max for r in results], rel=1e-5)
    code, out, err = run(argv[:2] + [" "] + argv[4:], capsys)
    assert code == 2 and "prompt is empty" in err


def test_probe_says_when_a_feature_does_not_fire(setup, tiny_dirs, capsys):  # noqa: F811
    from test_cli import run

    from mechscope.features.probe import probe_feature

    rm, _, path, _ = setup
    store = FeatureStore(path)
    prompt = "a cat sat on the mat"
    ids = rm.tokenize(prompt)
    inputs, _ = rm.model.run_with_mlp_sites(ids[None])
    silent = [(layer, f) for layer in range(2) for f in range(rm.transcoders.d_transcoder(layer))
              if store.feature(layer, f).max_value > 0
              and not (rm.transcoders.encode(layer, inputs[layer][0].float())[1:, f] > 0).any()]
    assert silent, "every feature fires on the prompt"
    layer, feature = silent[0]
    (result,) = probe_feature(rm, layer, feature, [prompt], store.feature(layer, feature).max_value)
    pre = rm.transcoders.pre_activations(layer, inputs[layer][0].float())[1:, feature]
    assert not result.active and result.max_activation == 0.0 and str(result.percent_of_max) == "0.0"
    assert result.position == int(pre.argmax()) + 1 and result.pre_activation == pytest.approx(float(pre.max()))
    code, out, err = run(["probe", f"{layer}/{feature}", prompt, "--store", str(path), "--model", str(tiny_dirs / "model"),
                          "--transcoders", _set_dir(tiny_dirs, rm)], capsys)
    assert code == 0, err
    assert "inactive" in out and "closest at" in out and "-0.0" not in out


def test_coactivation_matches_brute_force(setup):
    from mechscope.features.dense import coactivation

    rm, stream, _, _ = setup
    features = [(0, 1), (0, 2), (1, 5), (1, 9)]
    counts = coactivation(rm, stream, features, n_sequences=10, batch=4)
    _, acts = _brute_force(rm, stream, 10)
    active = torch.stack([(acts[layer][..., f] > 0).reshape(-1) for layer, f in features]).long()
    assert torch.equal(counts, active @ active.T)
    assert counts.diagonal().sum() > 0


def test_dense_cli_lists_densest_and_plots(setup, tiny_dirs, capsys, tmp_path):  # noqa: F811
    from test_cli import run

    rm, stream, path, _ = setup
    plot = tmp_path / "dense.png"
    argv = ["dense", "--top", "4", "--store", str(path), "--model", str(tiny_dirs / "model"), "--transcoders",
            _set_dir(tiny_dirs, rm), "--corpus", str(stream.corpus), "--coactivation-sequences", "8",
            "--plot", str(plot), "--json"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    data = json.loads(out)
    densest = FeatureStore(path).densest(4)
    assert [(r["layer"], r["feature"]) for r in data["features"]] == [(lay, f) for lay, f, _ in densest]
    assert len(data["cosines"]) == 4 and data["cosines"][0][0] == pytest.approx(1.0)
    assert isinstance(data["antipodal_pairs"], list)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run(["dense", "--top", "1", "--store", str(path)], capsys)
    assert code == 2 and "--top must be >= 2" in err


def test_trace_exports_store_labels_as_clerp_and_densities(setup, tiny_dirs, capsys, tmp_path):  # noqa: F811
    from test_cli import run, trace_args

    rm, _, path, _ = setup
    kind = rm.transcoders.kind
    labelled = tmp_path / "labelled.sqlite"
    labelled.write_bytes(path.read_bytes())
    store = FeatureStore(labelled)
    store.con.execute("UPDATE features SET label = ''")  # other tests label the shared store
    store.con.commit()
    code, out, err = run(trace_args(tiny_dirs, tmp_path / "graphs", "--store", str(labelled), "--json", kind=kind),
                         capsys)
    assert code == 0, err
    graph = json.loads(Path(json.loads(out)["graph_path"]).read_text())
    assert (graph["metadata"]["scan"], graph["metadata"]["transcoder_kind"]) == (store.meta["transcoders"], kind)
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    layer, index = (int(x) for x in features[0]["jsNodeId"].split("-")[0].split("_"))
    store.set_label(layer, index, "cat-ish")
    code, out, err = run(trace_args(tiny_dirs, tmp_path / "graphs", "--store", str(labelled), "--json", kind=kind),
                         capsys)
    graph = json.loads(Path(json.loads(out)["graph_path"]).read_text())
    densities = store.density_table()
    for node in (n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"):
        lay, f = (int(x) for x in node["jsNodeId"].split("-")[0].split("_"))
        assert node["clerp"] == ("cat-ish" if (lay, f) == (layer, index) else "")
        assert node["density"] == pytest.approx(float(densities[lay, f]))
    mismatched = tmp_path / "other.sqlite"
    mismatched.write_bytes(path.read_bytes())
    con = sqlite3.connect(mismatched)
    con.execute("UPDATE meta SET value = ? WHERE key = 'transcoders'", (json.dumps("another-set"),))
    con.commit()
    con.close()
    code, out, err = run(trace_args(tiny_dirs, tmp_path / "graphs", "--store", str(mismatched), kind=kind), capsys)
    assert code == 2 and "another-set" in err


def test_neuronpedia_feature_json_and_html_dashboard(setup, capsys, tmp_path):
    from test_cli import run

    from mechscope.features.export import dashboard_html, neuronpedia_feature
    from mechscope.node_ids import cantor_pair

    _, _, path, _ = setup
    store = FeatureStore(path)
    layer, feature, _ = store.densest(1)[0]
    dash = store.feature(layer, feature)
    data = neuronpedia_feature(dash, store.meta["model"], store.meta["transcoders"])
    groups = data["examples_quantiles"]
    assert groups[0]["quantile_name"] == "Top activations" and len(groups[0]["examples"]) == len(dash.top)
    assert [g["quantile_name"] for g in groups[1:]] == [f"Subsample Interval {q.index}" for q in dash.quantiles]
    assert len(groups) > 2  # a dense feature fills several intervals
    for group, examples in zip(groups, [dash.top] + [q.examples for q in dash.quantiles]):
        for out, example in zip(group["examples"], examples, strict=True):
            assert out["tokens"] == example.tokens and len(out["tokens_acts_list"]) == len(out["tokens"])
            assert out["tokens_acts_list"][out["train_token_ind"]] == pytest.approx(example.value, rel=1e-3)
    top = groups[0]["examples"][0]
    assert max(top["tokens_acts_list"]) == top["tokens_acts_list"][top["train_token_ind"]]
    assert data["act_max"] == dash.max_value and data["activation_frequency"] == dash.density
    assert data["top_logits"] == [t for t, _ in dash.pos_tokens] and data["index"] == cantor_pair(layer, feature)
    assert sum(data["freq_hist_data_bar_heights"]) == dash.active
    # CLI: one feature, then every feature that fired
    code, out, err = run(["features", "export", f"{layer}/{feature}", "--out", str(tmp_path / "np"),
                          "--store", str(path)], capsys)
    file = tmp_path / "np" / store.meta["transcoders"] / f"{cantor_pair(layer, feature)}.json"
    assert code == 0, err
    assert json.loads(file.read_text()) == json.loads(json.dumps(data))
    code, out, err = run(["features", "export", "--all", "--out", str(tmp_path / "all"), "--store", str(path)], capsys)
    assert code == 0 and len(list((tmp_path / "all").rglob("*.json"))) == len(store.active_features()) > 10
    code, out, err = run(["features", "export", "--out", str(tmp_path / "none"), "--store", str(path)], capsys)
    assert code == 2 and "--all" in err and not (tmp_path / "none").exists()
    # HTML: standalone (no scripts, no remote resources), escapes labels and tokens
    dash.label = "<script>alert(1)</script>"
    page = dashboard_html(dash, store.meta)
    assert "<script" not in page and "&lt;script&gt;" in page and "http" not in page
    assert f"{dash.top[0].value:.3f}" in page and page.count('class="example"') == len(dash.top) + sum(
        len(q.examples) for q in dash.quantiles)
    html_file = tmp_path / "d.html"
    code, out, err = run(["features", "show", f"{layer}/{feature}", "--store", str(path), "--html", str(html_file)],
                         capsys)
    assert code == 0 and "interval" in out and html_file.read_text().startswith("<!DOCTYPE html>")


def test_the_explorer_serves_a_traced_graph_and_its_features_cards(setup, tiny_dirs, capsys, tmp_path):  # noqa: F811
    """``trace`` then the explorer's server on the store's set: the listing names the graph and its
    set, the graph comes back byte for byte, and every feature node's card is that feature's
    dashboard in the store (whose values the brute-force test recomputes with the set's encoder)."""
    pytest.importorskip("starlette", reason="the server extra: pip install 'mechscope[server]'")
    from test_cli import run, trace_args
    from test_server import LiveServer

    rm, _, path, _ = setup
    code, out, err = run(trace_args(tiny_dirs, tmp_path / "graphs", "--json", "--max-feature-nodes", "20",
                                    "--no-prune", kind=rm.transcoders.kind), capsys)
    assert code == 0, err
    graph_path = Path(json.loads(out)["graph_path"])
    data = json.loads(graph_path.read_text())
    scan = data["metadata"]["scan"]
    features = {tuple(int(x) for x in n["node_id"].split("_")[:2])
                for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert scan == rm.transcoders.scan and len(features) > 10 and {layer for layer, _ in features} == {0, 1}
    store = FeatureStore(path)
    server = LiveServer({"directory": tmp_path / "graphs", "store": path})
    try:
        listing = json.loads(server.request("GET", "/api/graphs")[2])
        assert [(g["name"], g["scan"]) for g in listing["graphs"]] == [(graph_path.name, scan)]
        assert server.request("GET", f"/api/graphs/{graph_path.name}")[2] == graph_path.read_bytes()
        with_examples = 0
        for layer, feature in sorted(features):
            status, _, body = server.request("GET", f"/api/features/{layer}/{feature}?scan={scan}")
            card, dash = json.loads(body), store.feature(layer, feature)
            assert status == 200 and (card["layer"], card["feature"]) == (layer, feature)
            assert (card["max_value"], card["density"], card["hist"]) == (dash.max_value, dash.density, dash.hist)
            assert [(e["tokens"], e["value"]) for e in card["examples"]] == [(e.tokens, e.value) for e in dash.top[:8]]
            assert card["top_logits"] == [list(t) for t in dash.pos_tokens]
            with_examples += bool(card["examples"])
        assert with_examples > len(features) // 2
    finally:
        server.stop()


def test_build_cli_gives_the_librarys_store(setup, tiny_dirs, capsys, tmp_path):  # noqa: F811
    """``mechscope features build`` on the set saved to disk (a CLT's decoders then stay on disk,
    read lazily) streams the same tokens as the library call of ``setup`` and records the same
    maxima, densities and strongest activations for every feature of either kind of set."""
    from test_cli import run

    rm, stream, path, _ = setup
    store_path = tmp_path / "cli.sqlite"
    argv = ["features", "build", "--model", str(tiny_dirs / "model"), "--transcoders", _set_dir(tiny_dirs, rm),
            "--corpus", str(stream.corpus), "--tokens", str(N_TOKENS), "--ctx-len", str(CTX_LEN),
            "--batch-sequences", "6", "--quantile-tokens", str(BUILD["quantile_tokens"]), "--mix", stream.mix,
            "--seed", str(stream.seed), "--store", str(store_path), "--no-progress"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "feature store written to" in out
    cli, lib = FeatureStore(store_path), FeatureStore(path)
    assert cli.meta["n_tokens"] == lib.meta["n_tokens"] == N_TOKENS
    fired = 0
    for layer in range(rm.model.n_layers):
        for feature in range(rm.transcoders.d_transcoder(layer)):
            a, b = cli.feature(layer, feature), lib.feature(layer, feature)
            assert a.max_value == pytest.approx(b.max_value, rel=1e-5, abs=1e-6)
            assert a.density == b.density
            if b.top:  # the CLI keeps more, wider windows (top_k 20, window 32 against 4, 8)
                assert [e.value for e in a.top[: len(b.top)]] == pytest.approx([e.value for e in b.top], rel=1e-5)
                fired += 1
    assert fired > 10


def test_build_cli_rejects_empty_corpora(tiny_dirs, capsys, tmp_path):  # noqa: F811
    from test_cli import run

    short = tmp_path / "short.txt"
    short.write_text("a cat")  # fewer tokens than one context
    corpus = build_corpus(CorpusConfig(sources=(str(short),)), out=tmp_path / "short-corpus")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    tiny = ["--model", str(tiny_dirs / "model"), "--transcoders", str(tiny_dirs / "tcs")]
    store = tmp_path / "store.sqlite"
    for argv, message in ((["--corpus", str(corpus)], "has no train text"),
                          (["--corpus", str(tmp_path / "nothing")], "not a built corpus"),
                          (["--quantile-tokens", "-1"], "--quantile-tokens must be >= 0"),
                          (["--mix", "shuffled"], "'shuffled' is not one of 'source', 'document'")):
        code, out, err = run(["features", "build", *tiny, "--store", str(store), *argv], capsys)
        assert code == 2 and message in err, (argv, err)
        assert not store.exists()
    code, out, err = run(["corpus", "build", "--source", str(empty), "--out", str(tmp_path / "c2")], capsys)
    assert code == 2 and "empty.txt" in err and "yielded no documents" in err
