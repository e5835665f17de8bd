"""The feature store on a tiny model: maxima and top contexts equal a brute-force pass; resume; reader."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_adapter, make_tiny_transcoders
from test_cli import tiny_dirs  # noqa: F401  (module fixture)
from test_training import CTX_LEN, write_sources

from mechscope.data.corpus import CorpusConfig, TokenStream, build_corpus
from mechscope.errors import BadInputError
from mechscope.features import build
from mechscope.features.store import FeatureStore, parse_feature_id
from mechscope.replacement.replacement_model import ReplacementModel

N_TOKENS = 40 * (CTX_LEN - 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    txt, jsonl, _ = write_sources(root / "raw")
    corpus = build_corpus(CorpusConfig(sources=(str(txt), str(jsonl))), out=root / "corpus")
    adapter = make_tiny_adapter("llama")
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter, skip=True))
    stream = TokenStream(corpus, adapter.tokenizer, CTX_LEN, seed=5)
    path = build.build_feature_store(rm, stream, N_TOKENS, root / "store.sqlite", root / "ckpt",
                                     batch_sequences=6, top_k=4, window=8, n_logit_tokens=3, progress=False)
    return rm, stream, path, root


def _brute_force(rm, stream, n_sequences):
    ids = torch.as_tensor(np.stack([stream.sequence(i) for i in range(n_sequences)]))
    inputs, _ = rm.model.run_with_mlp_sites(ids)
    return ids, [rm.transcoders.encode(layer, x.float())[:, 1:] for layer, x in enumerate(inputs)]


def test_store_matches_brute_force(setup):
    rm, stream, path, _ = setup
    store = FeatureStore(path)
    assert store.meta["n_tokens"] == N_TOKENS
    ids, acts = _brute_force(rm, stream, 40)
    decode = rm.model.tokenizer.decode
    checked = 0
    for layer in range(rm.model.n_layers):
        for feature in range(0, rm.transcoders.d_transcoder(layer), 5):
            a = acts[layer][:, :, feature]
            dash = store.feature(layer, feature)
            assert dash.max_value == pytest.approx(float(a.max()), rel=1e-5)
            assert dash.density == pytest.approx(float((a > 0).float().mean()))
            assert sum(dash.hist) == dash.active == int((a > 0).sum())
            per_seq = a.amax(1)
            expected = per_seq.topk(4)
            # the 4 distinct sequences with the highest maxima (ties between identical windows in any order)
            assert [e.max_value for e in dash.top] == pytest.approx([float(v) for v in expected.values if v > 0])
            assert len({e.sequence for e in dash.top}) == len(dash.top)
            assert all(float(per_seq[e.sequence]) == pytest.approx(e.max_value) for e in dash.top)
            for e in dash.top:
                window = torch.arange(e.start, e.start + 8)
                assert e.tokens == [decode([int(t)]) for t in ids[e.sequence, window]]
                assert e.acts == pytest.approx(a[e.sequence, window - 1].half().float().tolist())
            assert len(dash.pos_tokens) == len(dash.neg_tokens) == 3
            assert dash.pos_tokens[0][1] >= dash.pos_tokens[-1][1] >= dash.neg_tokens[-1][1] >= dash.neg_tokens[0][1]
            checked += bool(dash.top)
    assert checked > 10


def test_interrupted_build_resumes_to_the_same_store(setup, monkeypatch):
    rm, stream, path, root = setup
    original = build._save
    calls = []

    def save_then_stop(*args):
        original(*args)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build.build_feature_store(rm, stream, N_TOKENS, root / "again.sqlite", root / "ckpt2", batch_sequences=6,
                                  top_k=4, window=8, n_logit_tokens=3, checkpoint_every_s=0.0, progress=False)
    monkeypatch.undo()
    again = build.build_feature_store(rm, stream, N_TOKENS, root / "again.sqlite", root / "ckpt2", batch_sequences=6,
                                      top_k=4, window=8, n_logit_tokens=3, progress=False)
    a, b = FeatureStore(path), FeatureStore(again)
    for layer, feature in [(0, 0), (1, 7), (1, 20)]:
        x, y = a.feature(layer, feature), b.feature(layer, feature)
        assert (x.max_value, x.hist, [e.sequence for e in x.top]) == (y.max_value, y.hist, [e.sequence for e in y.top])


def test_labels_bad_ids_and_reader_without_torch(setup, tmp_path):
    _, _, path, _ = setup
    store = FeatureStore(path)
    store.set_label(1, 3, "cat-ish")
    assert FeatureStore(path).labels() == {"1/3": "cat-ish"}
    assert len(store.densest(5)) == 5
    with pytest.raises(BadInputError, match="feature 9/0 is not in the store; layers 0..1"):
        store.feature(9, 0)
    with pytest.raises(BadInputError, match="LAYER/INDEX"):
        parse_feature_id("12:3")
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
    for argv, message in ((["features", "show", "1-4", "--store", str(path)], "LAYER/INDEX"),
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
    layer, feature = max(((lay, f) for lay in range(2) for f in range(48)), key=lambda k: store.feature(*k).density)
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
            "--transcoders", str(tiny_dirs / "tcs"), "--json"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [set(r) for r in rows] == [{"prompt", "max_activation", "percent_of_max", "token", "position"}] * 2
    assert [r["percent_of_max"] for r in rows] == pytest.approx([r.percent_of_max for r in results], rel=1e-5)
    code, out, err = run(argv[:2] + [" "] + argv[4:], capsys)
    assert code == 2 and "prompt is empty" in err


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

    _, stream, path, _ = setup
    plot = tmp_path / "dense.png"
    argv = ["dense", "--top", "4", "--store", str(path), "--model", str(tiny_dirs / "model"), "--transcoders",
            str(tiny_dirs / "tcs"), "--corpus", str(stream.corpus), "--coactivation-sequences", "8",
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
