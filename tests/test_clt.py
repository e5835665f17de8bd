"""Cross-layer transcoders through the same science checks as per-layer sets (tiny models)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PROMPT, make_tiny_clt
from test_cli import tiny_dirs  # noqa: F401  (module fixture)
from test_attribution import (
    check_edges_predict_doubling_a_source,
    check_preactivation_is_sum_of_edges_plus_bias,
    check_replacement_reproduces_logits,
)

from mechscope.attribution.attribute import AttributionConfig, attribute
from mechscope.replacement.replacement_model import ReplacementModel
from mechscope.transcoders.transcoder import CrossLayerTranscoderSet


@pytest.fixture(params=["gemma3", "llama", "qwen2"])
def clt_model(request, tiny_adapter):
    adapter = tiny_adapter(request.param)
    return ReplacementModel(adapter, make_tiny_clt(adapter, skip=request.param != "llama"))


@pytest.mark.parametrize("check", [check_replacement_reproduces_logits, check_preactivation_is_sum_of_edges_plus_bias,
                                   check_edges_predict_doubling_a_source])
def test_the_science_holds_for_a_cross_layer_transcoder(clt_model, check):
    check(clt_model, TINY_PROMPT)


def test_a_clt_reconstruction_sums_every_earlier_layers_features(tiny_adapter):
    adapter = tiny_adapter("gemma3")
    clt = make_tiny_clt(adapter)
    ids = adapter.tokenize(TINY_PROMPT)
    ins, _ = adapter.run_with_mlp_sites(ids[None])
    acts = [clt.encode(layer, ins[layer][0]) for layer in range(clt.n_layers)]
    recon = clt.reconstruct(acts, [x[0] for x in ins])
    for m in range(clt.n_layers):
        by_hand = clt.b_dec[m] + sum(acts[l] @ clt.W_dec[l][:, m - l] for l in range(m + 1))
        torch.testing.assert_close(recon[m], by_hand)
    # layer 0's features reach the last layer's output: zeroing them changes it
    zeroed = clt.reconstruct([torch.zeros_like(acts[0])] + acts[1:], [x[0] for x in ins])
    assert not torch.allclose(zeroed[-1], recon[-1])


def test_graphs_of_a_clt_record_its_kind(clt_model):
    from mechscope.export.neuronpedia import to_neuronpedia, validate_neuronpedia

    graph = attribute(clt_model, TINY_PROMPT, AttributionConfig(max_feature_nodes=20))
    data = to_neuronpedia(graph, None, "clt")
    validate_neuronpedia(data)
    assert data["metadata"]["transcoder_kind"] == "cross-layer"


@pytest.mark.parametrize("skip", [False, True])
def test_a_clt_round_trips_in_circuit_tracers_layout(tiny_adapter, tmp_path, skip):
    from safetensors.torch import load_file

    from mechscope.errors import CorruptFileError
    from mechscope.transcoders.io import load_transcoder_set, save_transcoder_set

    adapter = tiny_adapter("gemma3")
    clt = make_tiny_clt(adapter, skip=skip)
    save_transcoder_set(clt, tmp_path / "clt")
    files = sorted(p.name for p in (tmp_path / "clt").iterdir())
    assert files == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors",
                     "W_enc_1.safetensors", "W_enc_2.safetensors", "config.yaml"]
    dec = load_file(str(tmp_path / "clt" / "W_dec_1.safetensors"))
    assert dec["W_dec_1"].shape == (32, 2, adapter.d_model)  # a layer-1 feature writes to layers 1 and 2
    enc = load_file(str(tmp_path / "clt" / "W_enc_0.safetensors"))
    assert set(enc) == {"W_enc_0", "b_enc_0", "b_dec_0", "threshold_0"} | ({"W_skip_0"} if skip else set())
    loaded = load_transcoder_set(tmp_path / "clt")
    assert isinstance(loaded, CrossLayerTranscoderSet) and loaded.kind == "cross-layer"
    ins, _ = adapter.run_with_mlp_sites(adapter.tokenize(TINY_PROMPT)[None])
    inputs = [x[0] for x in ins]
    acts = [clt.encode(layer, x) for layer, x in enumerate(inputs)]
    for layer, x in enumerate(inputs):
        assert torch.equal(loaded.encode(layer, x), acts[layer])
    for a, b in zip(loaded.reconstruct(acts, inputs), clt.reconstruct(acts, inputs)):
        torch.testing.assert_close(a, b)
    (tmp_path / "clt" / "W_dec_2.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(CorruptFileError, match="W_dec_2"):
        load_transcoder_set(tmp_path / "clt")


def test_edges_of_a_clt_predict_constrained_interventions(clt_model):
    """Scaling a CLT feature moves every later feature's pre-activation by (factor - 1) x the edge,
    through all the layers the feature writes to."""
    from test_interventions import check_constrained_frozen_effect_equals_edge_times_change

    graph = attribute(clt_model, TINY_PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=32))
    check_constrained_frozen_effect_equals_edge_times_change(clt_model, graph)


def test_gemma_scope_2_clt_directories_load_with_their_conventions(tmp_path):
    """Synthetic Gemma Scope 2 CLT files: w_enc (d_model, d_sae), w_dec to every layer (the columns
    before a feature's own layer unused), affine skip applied as x @ A."""
    from safetensors.torch import save_file

    from mechscope.transcoders.io import load_transcoder_set

    gen = torch.Generator().manual_seed(0)
    n_layers, d_model, d_sae = 3, 8, 12
    raw = []
    for layer in range(n_layers):
        p = {"w_enc": torch.randn(d_model, d_sae, generator=gen), "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
             "b_dec": torch.randn(d_model, generator=gen) * 0.1, "threshold": torch.rand(d_sae, generator=gen) * 0.5,
             "w_dec": torch.randn(d_sae, n_layers, d_model, generator=gen),
             "affine_skip_connection": torch.randn(d_model, d_model, generator=gen) * 0.1}
        save_file(p, str(tmp_path / f"params_layer_{layer}.safetensors"))
        raw.append(p)
    clt = load_transcoder_set(tmp_path)
    assert isinstance(clt, CrossLayerTranscoderSet) and clt.n_layers == 3
    xs = [torch.randn(5, d_model, generator=gen) for _ in range(n_layers)]
    acts = []
    for layer, (p, x) in enumerate(zip(raw, xs)):  # Gemma Scope's own convention, written out
        pre = x @ p["w_enc"] + p["b_enc"]
        acts.append(torch.relu(pre) * (pre > p["threshold"]))
        torch.testing.assert_close(clt.encode(layer, x), acts[-1])
    recon = clt.reconstruct(acts, xs)
    for m in range(n_layers):
        by_hand = raw[m]["b_dec"] + sum(acts[l] @ raw[l]["w_dec"][:, m] for l in range(m + 1)) + xs[m] @ raw[m]["affine_skip_connection"]
        torch.testing.assert_close(recon[m], by_hand)


def test_lazy_decoder_reads_give_the_same_graph(tiny_adapter, tmp_path):
    """Decoder rows read on demand from the files equal the loaded decoders: the same activations,
    reconstructions and attribution graph."""
    from mechscope.transcoders.clt_io import load_clt
    from mechscope.transcoders.io import save_transcoder_set

    adapter = tiny_adapter("gemma3")
    save_transcoder_set(make_tiny_clt(adapter, skip=True), tmp_path / "clt")
    eager, lazy = load_clt(tmp_path / "clt"), load_clt(tmp_path / "clt", lazy_decoder=True)
    assert lazy.lazy_decoder is not None and sum(p.numel() for p in lazy.W_dec) == 0
    features = torch.tensor([0, 1, 2, 7, 9, 10, 31])
    for layer in range(eager.n_layers):
        assert torch.equal(lazy.decoder_vectors(layer, features), eager.decoder_vectors(layer, features))
    config = AttributionConfig(max_feature_nodes=None, batch_size=32)
    a = attribute(ReplacementModel(adapter, eager), TINY_PROMPT, config)
    b = attribute(ReplacementModel(adapter, lazy), TINY_PROMPT, config)
    assert torch.equal(a.active_features, b.active_features)
    torch.testing.assert_close(a.adjacency, b.adjacency, atol=1e-6, rtol=1e-5)


def test_iterative_error_zeroing_on_a_clt_replaces_the_output_by_its_reconstruction(tiny_adapter):
    """Zeroing a CLT error node live = that MLP output replaced by the reconstruction from every
    earlier layer's live features (a hand-written edit)."""
    from mechscope.interventions.intervene import InterventionConfig, run_interventions
    from mechscope.interventions.records import ErrorTarget, Intervention

    adapter = tiny_adapter("gemma3")
    rm = ReplacementModel(adapter, make_tiny_clt(adapter, skip=True))
    ids = rm.tokenize(TINY_PROMPT)
    layer, pos = 1, len(ids) - 2  # reaches the last position through layer 2's attention
    live = {}

    def edit(l, x, y):
        a = rm.transcoders.encode(l, x[0])
        a[:1] = 0
        live[l] = a
        if l != layer:
            return y
        y = y.clone()
        y[0, pos] = rm.decode_upto(layer, [live[i] for i in range(layer + 1)], x[0])[pos]
        return y

    expected = rm.model.output_logits(rm.model.edited_forward(ids[None], edit)[0, -1])
    result = run_interventions(rm, ids, [Intervention(ErrorTarget(layer, (pos,)), "zero")],
                               InterventionConfig(freeze_attention=False))
    assert torch.allclose(result.intervened_logits, expected, atol=1e-5)
    assert float((result.intervened_logits - result.clean_logits).abs().max()) > 1e-4


def _broken_clts(tiny_dirs, root):
    """``(name, directory, words the error must contain)``: copies of the llama's saved CLT, each
    broken in one way the issue names, and a CLT of the 3-layer Gemma 3 model."""
    import shutil

    from conftest import make_tiny_adapter
    from safetensors.torch import load_file, save_file

    from mechscope.transcoders.io import save_transcoder_set

    def copy(name):
        shutil.copytree(tiny_dirs / "clt", root / name)
        return root / name

    cases = []
    short = copy("short-decoder")  # W_dec_0 writes to one output layer instead of two
    tensors = load_file(short / "W_dec_0.safetensors")
    save_file({"W_dec_0": tensors["W_dec_0"][:, :1].contiguous()}, short / "W_dec_0.safetensors")
    cases.append(("short-decoder", short, ["W_dec_0", "(48, 2, 32)", "(48, 1, 32)"]))
    missing = copy("missing-layer")
    (missing / "W_dec_1.safetensors").unlink()
    cases.append(("missing-layer", missing, ["W_dec_1.safetensors", "missing"]))
    truncated = copy("truncated")
    data = (truncated / "W_enc_1.safetensors").read_bytes()
    (truncated / "W_enc_1.safetensors").write_bytes(data[: len(data) // 2])
    cases.append(("truncated", truncated, ["W_enc_1.safetensors", "truncated"]))
    truncated_decoder = copy("truncated-decoder")  # read lazily by a trace: checked when opened
    data = (truncated_decoder / "W_dec_1.safetensors").read_bytes()
    (truncated_decoder / "W_dec_1.safetensors").write_bytes(data[:-100])
    cases.append(("truncated-decoder", truncated_decoder, ["W_dec_1.safetensors", "truncated"]))
    other = make_tiny_adapter("gemma3")
    save_transcoder_set(make_tiny_clt(other), root / "other-model")
    cases.append(("other-model", root / "other-model", ["3 layers", "2 layers"]))
    return cases


def test_a_broken_clt_is_one_clear_error_exit_2_and_nothing_written(tiny_dirs, tmp_path, capsys):  # noqa: F811
    """The issue's bad input: a ``W_dec_{i}`` with the wrong number of output layers, a missing
    layer file, a truncated file, a CLT whose layer count does not fit the model: reading the
    directory raises ``CorruptFileError`` whether decoders are read eagerly or lazily, and ``trace``
    exits 2 naming the problem, and writes nothing."""
    from test_cli import run

    from mechscope.errors import CorruptFileError
    from mechscope.transcoders.clt_io import load_clt

    for name, directory, words in _broken_clts(tiny_dirs, tmp_path):
        if name != "other-model":  # the files themselves are broken: eager and lazy reads refuse them
            for lazy in (False, True):
                with pytest.raises(CorruptFileError) as error:
                    load_clt(directory, lazy_decoder=lazy)
                assert all(w in str(error.value) for w in words), (name, lazy, error.value)
        out = tmp_path / f"graphs-{name}"
        code, _, err = run(["trace", "a cat sat", "--model", str(tiny_dirs / "model"), "--transcoders",
                            str(directory), "--out", str(out)], capsys)
        assert code == 2, (name, err)
        assert all(w in err for w in words), (name, err)
        assert "Traceback" not in err
        assert not out.exists() or not any(out.iterdir()), name


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_iterative_zeroing_of_a_clt_feature_removes_it_from_every_layer_it_writes_to(tiny_adapter, family):
    """Zeroing a CLT feature live (unfrozen attention) = subtracting, at its own layer and every
    later one, its live activation times its decoder row for that output layer, by hand."""
    from mechscope.interventions.intervene import InterventionConfig, run_interventions
    from mechscope.interventions.records import FeatureTarget, Intervention

    adapter = tiny_adapter(family)
    rm = ReplacementModel(adapter, make_tiny_clt(adapter, skip=True))
    ids = rm.tokenize(TINY_PROMPT)
    layer, pos = 0, len(ids) - 1  # the last position: its later layers' outputs reach the logits directly
    acts = rm.transcoders.encode(layer, adapter.run_with_mlp_sites(ids[None])[0][layer][0].float())[pos]
    feature = int(acts.argmax())
    assert acts[feature] > 0
    live = {}

    def edit(l, x, y):
        if l == layer:
            live["a"] = rm.transcoders.encode(layer, x[0].float())[pos, feature]
        if l < layer:
            return y
        y = y.clone()
        y[0, pos] -= (live["a"] * rm.transcoders.W_dec[layer][feature, l - layer]).to(y.dtype)
        return y

    expected = rm.model.output_logits(rm.model.edited_forward(ids[None], edit)[0, -1])
    result = run_interventions(rm, ids, [Intervention(FeatureTarget(layer, feature, (pos,)), "zero")],
                               InterventionConfig(freeze_attention=False))
    assert torch.allclose(result.intervened_logits, expected, atol=1e-5)
    only_own_layer = {}

    def edit_own_layer(l, x, y):  # the per-layer reading of the same zeroing: a different result
        if l != layer:
            return y
        only_own_layer["a"] = rm.transcoders.encode(layer, x[0].float())[pos, feature]
        y = y.clone()
        y[0, pos] -= only_own_layer["a"] * rm.transcoders.W_dec[layer][feature, 0]
        return y

    own = rm.model.output_logits(rm.model.edited_forward(ids[None], edit_own_layer)[0, -1])
    assert float((result.intervened_logits - own).abs().max()) > 1e-4
