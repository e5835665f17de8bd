"""``benchmarks/clt_vs_plt.py`` on tiny random models: its figures are well-formed and consistent, a
set compared with itself gives identical figures, zeroing a CLT feature on the real model removes
it from every layer it writes to, and bad input is one error with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_PROMPT, make_tiny_clt
from test_training import write_sources

from mechscope.attribution.attribute import AttributionConfig, attribute
from mechscope.errors import IncompatibleTranscodersError
from mechscope.interventions.intervene import InterventionConfig, run_interventions
from mechscope.interventions.records import FeatureTarget, Intervention
from mechscope.replacement.replacement_model import ReplacementModel

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "clt_vs_plt.py"
PROMPTS = [TINY_PROMPT, "the dog ran far", "X1 = Y2 + 3"]
CTX_LEN = 16


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("clt_vs_plt", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A zero-argument function returning a tiny held-out token stream (character tokenizer)."""
    from conftest import make_tiny_tokenizer

    from mechscope.data.corpus import CorpusConfig, TokenStream, build_corpus

    root = tmp_path_factory.mktemp("corpus")
    txt, jsonl, _ = write_sources(root / "raw")
    corpus = build_corpus(CorpusConfig(sources=(str(txt), str(jsonl)), heldout_every=3), out=root / "built")
    return lambda: TokenStream(corpus, make_tiny_tokenizer(), CTX_LEN, "heldout")


@pytest.fixture(scope="module")
def sets(tiny_adapter, make_tiny_transcoders):
    adapter = tiny_adapter("gemma3")
    return adapter, {"PLT": make_tiny_transcoders(adapter, d_transcoder=32, skip=True),
                     "CLT": make_tiny_clt(adapter, skip=True)}


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_the_figures_are_well_formed(bench, sets, heldout, tmp_path):
    adapter, tcs = sets
    config = bench.CompareConfig(top_k=4, eval_sequences=4)
    results = bench.compare(adapter, tcs, PROMPTS, config, heldout=heldout)
    assert list(results["sets"]) == ["PLT", "CLT"] and results["prompts"] == PROMPTS
    finite_rhos = 0
    for label, s in results["sets"].items():
        assert s["kind"] == ("per-layer" if label == "PLT" else "cross-layer")
        assert s["layers_source"].startswith("evaluated") and len(s["layers"]) == adapter.n_layers
        for m in s["layers"]:
            assert 0 <= m["fvu"] < 100 and 0 < m["l0"] <= s["d_transcoder"] and m["n_tokens"] > 0
        assert len(s["per_prompt"]) == len(PROMPTS)
        for p in s["per_prompt"]:
            assert 0 <= p["replacement_score"] <= 1 and 0 <= p["completeness_score"] <= 1
            assert 1 <= p["feature_nodes_to_fraction"] <= p["n_feature_nodes"] <= p["n_active"]
            assert len(p["interventions"]) == min(config.top_k, p["n_feature_nodes"])
            assert len({r["node_id"] for r in p["interventions"]}) == len(p["interventions"])
            assert all(math.isfinite(r["measured"]) and math.isfinite(r["predicted"]) for r in p["interventions"])
            assert any(abs(r["measured"]) > 1e-4 for r in p["interventions"])  # zeroing a feature does something
            for key in ("spearman_rho", "spearman_rho_raw"):
                assert math.isnan(p[key]) or -1 - 1e-9 <= p[key] <= 1 + 1e-9
            finite_rhos += math.isfinite(p["spearman_rho"])
        for key, s_key in s["summary"].items():
            assert s_key["n"] <= len(PROMPTS)
        assert 0 <= s["summary"]["replacement_score"]["mean"] <= 1 and s["summary"]["replacement_score"]["std"] >= 0
    assert finite_rhos > 0
    # the same model, so the same top target for both sets
    targets = [[p["top_target"] for p in s["per_prompt"]] for s in results["sets"].values()]
    assert targets[0] == targets[1]
    for table in (bench.layer_table(results), bench.prompt_table(results), bench.summary_table(results)):
        assert "PLT" in table and "CLT" in table
    assert bench.summary_table(results).count("\n") == 3  # header, rule, one line per set
    json.dumps(bench._json_ready(results), allow_nan=False)
    assert bench.plot(results, tmp_path / "plot.png") and (tmp_path / "plot.png").stat().st_size > 0


def test_a_set_compared_with_itself_gives_identical_figures(bench, sets):
    adapter, tcs = sets
    config = bench.CompareConfig(top_k=3)
    results = bench.compare(adapter, {"a": tcs["CLT"], "b": tcs["CLT"]}, PROMPTS[:2], config)
    a, b = (_without_times(results["sets"][k]) for k in ("a", "b"))
    assert a["layers"] is None and a["layers_source"] == "not available"
    assert a == b


def test_per_layer_figures_come_from_config_yaml_unless_reevaluated(bench, sets, heldout, tmp_path):
    from mechscope.transcoders.io import load_transcoder_set, save_transcoder_set

    adapter, tcs = sets
    stored = [{"layer": i, "fvu": 0.1 * i, "l0": 5.0, "dead_fraction": 0.0, "n_tokens": 7} for i in range(3)]
    save_transcoder_set(tcs["CLT"], tmp_path / "clt", extra_config={"heldout_metrics": stored})
    loaded = load_transcoder_set(tmp_path / "clt")
    assert bench.layer_figures(adapter, loaded, tmp_path / "clt", None, bench.CompareConfig()) == (
        stored, "config.yaml heldout_metrics")
    layers, source = bench.layer_figures(adapter, loaded, tmp_path / "clt", heldout,
                                         bench.CompareConfig(eval_sequences=2, reevaluate=True))
    assert source.startswith("evaluated") and [m["n_tokens"] for m in layers] == [2 * (CTX_LEN - 1)] * 3


def test_zeroing_a_clt_feature_removes_it_from_every_layer_it_writes_to(sets):
    """The benchmark's intervention (iterative, attention frozen) on a CLT feature of layer 0 equals
    subtracting its decoder row at every output layer by hand."""
    adapter, tcs = sets
    clt = tcs["CLT"]
    rm = ReplacementModel(adapter, clt)
    graph = attribute(rm, TINY_PROMPT, AttributionConfig(max_feature_nodes=None))
    last = [n for n in range(graph.n_features) if graph.feature_of(n)[:2] == (0, graph.n_pos - 1)]
    node = max(last, key=lambda n: graph.feature_of(n).activation)  # at layer 0, last position
    layer, pos, feature, activation = graph.feature_of(node)
    decoder = clt.W_dec[layer][feature]  # (n_layers - layer, d_model)
    trace = rm.trace(graph.input_ids)

    def edit(out_layer, x, y):
        y = y.clone()
        y[0, pos] -= activation * decoder[out_layer - layer]
        return y

    final = adapter.edited_forward(graph.input_ids[None], edit, trace.run.frozen.patterns)
    expected = adapter.output_logits(final[0, -1])
    result = run_interventions(rm, graph.input_ids, [Intervention(FeatureTarget(layer, feature, (pos,)), "zero")],
                               InterventionConfig(freeze_attention=True))
    assert torch.allclose(result.intervened_logits, expected, atol=1e-5)
    # only the first output layer would not do: the later layers' decoder rows matter
    final_first = adapter.edited_forward(graph.input_ids[None],
                                         lambda m, x, y: edit(m, x, y) if m == layer else y, trace.run.frozen.patterns)
    assert not torch.allclose(result.intervened_logits, adapter.output_logits(final_first[0, -1]), atol=1e-4)


def test_helpers(bench):
    assert bench.feature_nodes_to_fraction(torch.tensor([1.0, 4.0, 2.0, 3.0]), 0.8) == 3  # 0.4, 0.7, 0.9
    assert bench.feature_nodes_to_fraction(torch.tensor([1.0, 4.0, 2.0, 3.0]), 1.0) == 4
    assert bench.feature_nodes_to_fraction(torch.tensor([0.0, 0.0]), 0.8) == 0
    assert bench.rank_correlation([1.0, 2.0, 3.0], [10.0, 20.0, 40.0]) == pytest.approx(1.0)
    assert bench.rank_correlation([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert math.isnan(bench.rank_correlation([1.0, 1.0], [1.0, 2.0]))
    assert len(bench.DEFAULT_PROMPTS) >= 20 and "Fact: Michael Jordan plays the sport of" in bench.DEFAULT_PROMPTS


def test_a_set_for_another_model_is_refused(bench, sets, tiny_adapter, make_tiny_transcoders):
    adapter, tcs = sets
    llama = tiny_adapter("llama")
    with pytest.raises(IncompatibleTranscodersError, match="tiny-llama"):
        bench.compare(adapter, {"PLT": make_tiny_transcoders(llama)}, PROMPTS)
    other = make_tiny_clt(adapter)
    other.model_name = "google/gemma-3-270m"
    with pytest.raises(IncompatibleTranscodersError, match="google/gemma-3-270m"):
        bench.compare(adapter, {"PLT": tcs["PLT"], "CLT": other}, PROMPTS)


@pytest.mark.parametrize("case", ["missing prompts", "empty prompts", "unknown set"])
def test_bad_input_is_one_error_and_exit_code_2(bench, case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    argv, named = {"missing prompts": (["--prompts", str(tmp_path / "nope.txt")], "nope.txt"),
                   "empty prompts": (["--prompts", str(empty)], "no prompts"),
                   "unknown set": (["--plt", "no-such-set"], "--plt: unknown transcoder set 'no-such-set'")}[case]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and err.count("\n") == 1
