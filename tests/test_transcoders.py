"""Transcoders: activation functions, the per-layer transcoder maths, and the file formats.

The layer files are read back with ``safetensors`` directly, so the tests pin circuit-tracer's
layout (key names and orientations), not just mechscope's own round trip. Gemma Scope 2 files are
synthesised here and checked against a from-scratch computation in Gemma Scope's convention
(``pre = x @ w_enc + b_enc``, ``y = acts @ w_dec + b_dec + x @ A``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import random_set

from mechscope.errors import BadInputError, CorruptFileError, UnknownNameError
from mechscope.transcoders import io as tc_io
from mechscope.transcoders.activations import ACTIVATIONS, JumpReLU, ReLU, TopK, make_activation
from mechscope.transcoders.io import (
    load_gemma_scope_2,
    load_transcoder_set,
    save_transcoder_set,
    shipped_sets,
)
from mechscope.transcoders.transcoder import PerLayerTranscoderSet


# ------------------------------------------------------------------------------------ helpers


def assert_sets_equal(a: PerLayerTranscoderSet, b: PerLayerTranscoderSet, atol: float = 0.0) -> None:
    assert a.n_layers == b.n_layers and a.d_model == b.d_model
    for ta, tb in zip(a.transcoders, b.transcoders):
        assert type(ta.activation_function) is type(tb.activation_function)
        sa, sb = ta.state_dict(), tb.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sb[key].dtype == torch.float32, key
            if atol == 0.0:
                assert torch.equal(sa[key], sb[key]), key
            else:
                torch.testing.assert_close(sb[key], sa[key], atol=atol, rtol=1e-2, msg=key)


# ------------------------------------------------------------------------------------ activations
def test_relu_zeroes_negatives_only():
    x = torch.tensor([[-2.0, -0.0, 0.5, 3.0]])
    assert torch.equal(ReLU()(x), torch.tensor([[0.0, 0.0, 0.5, 3.0]]))


def test_jumprelu_keeps_raw_value_strictly_above_per_feature_threshold():
    act = JumpReLU(torch.tensor([0.0, 0.5, 1.0]))
    x = torch.tensor(
        [
            [0.2, 0.4, 1.5],  # above, below, above
            [-0.1, 0.5, 1.0],  # below, exactly at, exactly at
            [0.0, 0.6, 0.99],  # exactly at, above, below
        ]
    )
    expected = torch.tensor(
        [
            [0.2, 0.0, 1.5],  # not shifted by the threshold: x * (x > t)
            [0.0, 0.0, 0.0],
            [0.0, 0.6, 0.0],
        ]
    )
    assert torch.equal(act(x), expected)
    assert act.threshold.shape == (3,)
    assert "threshold" in dict(act.named_parameters())  # saved as activation_function.threshold


def test_topk_keeps_exactly_the_k_largest_per_row():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 12, generator=gen).abs() + 0.1  # all positive, distinct
    out = TopK(4)(x)
    assert out.shape == x.shape
    assert ((out != 0).sum(-1) == 4).all()
    kept = out != 0
    # every kept value is its raw input, and every kept value beats every dropped one
    assert torch.equal(out[kept], x[kept])
    min_kept = torch.where(kept, x, torch.inf).amin(-1)
    max_dropped = torch.where(kept, -torch.inf, x).amax(-1)
    assert (min_kept > max_dropped).all()
    assert torch.equal(out.topk(4, dim=-1).indices.sort().values, x.topk(4, dim=-1).indices.sort().values)


def test_topk_drops_non_positive_values_even_among_the_top_k():
    x = torch.tensor([[3.0, -1.0, -2.0, 0.5], [-1.0, -2.0, -3.0, -4.0]])
    out = TopK(3)(x)
    assert torch.equal(out, torch.tensor([[3.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    # k larger than the width keeps every positive value
    assert torch.equal(TopK(10)(x), torch.relu(x))


def test_make_activation_builds_each_kind():
    assert isinstance(make_activation("relu", 8), ReLU)
    jump = make_activation("jumprelu", 8, threshold=torch.full((8,), 0.3))
    assert isinstance(jump, JumpReLU) and torch.equal(jump.threshold, torch.full((8,), 0.3))
    assert torch.equal(make_activation("jumprelu", 8).threshold, torch.zeros(8))
    topk = make_activation("topk", 8, k=3)
    assert isinstance(topk, TopK) and topk.k == 3
    assert ACTIVATIONS == ("relu", "jumprelu", "topk")


def test_make_activation_rejects_unknown_name_and_lists_choices():
    with pytest.raises(BadInputError) as info:
        make_activation("gelu", 8)
    message = str(info.value)
    assert "gelu" in message
    for name in ("relu", "jumprelu", "topk"):
        assert name in message


@pytest.mark.parametrize("k", [0, -3])
def test_topk_rejects_k_below_one(k):
    with pytest.raises(BadInputError, match="k"):
        TopK(k)
    with pytest.raises(BadInputError, match="k"):
        make_activation("topk", 8, k=k)


def test_topk_without_k_is_rejected():
    with pytest.raises(BadInputError, match="k"):
        make_activation("topk", 8)


# ------------------------------------------------------------------------------------ transcoder
def test_encode_decode_shapes():
    tc = random_set(n_layers=1, d_model=16, d_transcoder=24)[0]
    x = torch.randn(3, 5, 16)
    acts = tc.encode(x)
    assert acts.shape == (3, 5, 24)
    assert tc.pre_activations(x).shape == (3, 5, 24)
    assert tc.decode(acts, x).shape == (3, 5, 16)
    assert tc(x).shape == (3, 5, 16)
    assert (acts > 0).any() and (acts == 0).any()  # the test data actually exercises sparsity


def test_transcoder_maths_with_skip_matches_manual_computation():
    tc = random_set(n_layers=1, d_model=16, d_transcoder=24, skip=True)[0]
    assert not torch.allclose(tc.W_skip, tc.W_skip.T)  # so the orientation is visible
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    pre = x @ tc.W_enc.T + tc.b_enc  # W_enc: (d_transcoder, d_model)
    acts = pre * (pre > tc.activation_function.threshold)
    expected = acts @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T
    torch.testing.assert_close(tc.encode(x), acts)
    torch.testing.assert_close(tc(x), expected)
    torch.testing.assert_close(tc.skip(x), x @ tc.W_skip.T)
    wrong = acts @ tc.W_dec + tc.b_dec + x @ tc.W_skip
    assert not torch.allclose(tc(x), wrong, atol=1e-3)


def test_transcoder_without_skip_has_no_skip_path():
    tc = random_set(n_layers=1, skip=False)[0]
    x = torch.randn(4, 16)
    assert tc.W_skip is None and tc.skip(x) is None
    torch.testing.assert_close(tc(x), tc.encode(x) @ tc.W_dec + tc.b_dec)


def test_set_decoder_vectors_are_W_dec_rows(tiny_adapter, make_tiny_transcoders):
    adapter = tiny_adapter("llama")
    transcoders = make_tiny_transcoders(adapter, d_transcoder=48, skip=True)
    idx = torch.tensor([5, 0, 47, 5])
    for layer in range(transcoders.n_layers):
        vectors = transcoders.decoder_vectors(layer, idx)
        assert vectors.shape == (4, 1, adapter.d_model)
        assert torch.equal(vectors[:, 0], transcoders[layer].W_dec[idx])
        assert list(transcoders.output_layers(layer)) == [layer]
        assert torch.equal(transcoders.encoder_vectors(layer, idx), transcoders[layer].W_enc[idx])
        assert torch.equal(transcoders.encoder_bias(layer, idx), transcoders[layer].b_enc[idx])
        assert transcoders.d_transcoder(layer) == 48


def test_set_reconstruct_equals_per_layer_forward(tiny_adapter, make_tiny_transcoders):
    adapter = tiny_adapter("llama")
    transcoders = make_tiny_transcoders(adapter, d_transcoder=48, skip=True)
    ids = adapter.tokenize("the cat sat")
    mlp_inputs, _ = adapter.run_with_mlp_sites(ids[None])
    acts = [transcoders.encode(layer, x) for layer, x in enumerate(mlp_inputs)]
    assert all((a > 0).any() for a in acts)
    outputs = transcoders.reconstruct(acts, mlp_inputs)
    assert len(outputs) == transcoders.n_layers
    for layer, (x, y) in enumerate(zip(mlp_inputs, outputs)):
        torch.testing.assert_close(y, transcoders[layer](x))


# ------------------------------------------------------------------------------------ native layout
@pytest.mark.parametrize("skip", [True, False])
def test_float32_round_trip_is_exact(tmp_path, skip):
    original = random_set(skip=skip)
    path = save_transcoder_set(original, tmp_path / "set")
    loaded = load_transcoder_set(path)
    assert_sets_equal(original, loaded)
    assert loaded.model_name == "tiny" and loaded.scan == "tiny-plt"
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(3, 16)
    assert torch.equal(loaded[1](x), original[1](x))


def test_bfloat16_round_trip_is_close_and_half_the_size(tmp_path):
    original = random_set(d_model=64, d_transcoder=128)
    f32 = save_transcoder_set(original, tmp_path / "f32")
    bf16 = save_transcoder_set(original, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = load_transcoder_set(bf16)
    assert_sets_equal(original, loaded, atol=2e-2)
    for name, tensor in load_file(str(bf16 / "layer_0.safetensors")).items():
        assert tensor.dtype == torch.bfloat16, name

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.glob("layer_*.safetensors"))

    assert 0.45 < size(bf16) / size(f32) < 0.55


def test_saved_layout_is_circuit_tracers(tmp_path):
    original = random_set(n_layers=3, d_model=16, d_transcoder=24, skip=True)
    path = save_transcoder_set(original, tmp_path / "set")
    config = yaml.safe_load((path / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "mlp.hook_in"
    assert config["feature_output_hook"] == "hook_mlp_out"
    assert config["transcoders"] == ["layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors"]
    assert config["model_name"] == "tiny"
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", *config["transcoders"]]
    for layer, name in enumerate(config["transcoders"]):
        tensors = load_file(str(path / name))
        assert set(tensors) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"}
        assert tensors["W_enc"].shape == (24, 16)  # (d_transcoder, d_model)
        assert tensors["W_dec"].shape == (24, 16)  # (d_transcoder, d_model)
        assert tensors["b_enc"].shape == (24,)
        assert tensors["b_dec"].shape == (16,)
        assert tensors["activation_function.threshold"].shape == (24,)
        assert tensors["W_skip"].shape == (16, 16)
        assert torch.equal(tensors["W_enc"], original[layer].W_enc)
        assert torch.equal(tensors["W_skip"], original[layer].W_skip)


def test_saved_layout_without_skip_has_no_W_skip(tmp_path):
    path = save_transcoder_set(random_set(skip=False), tmp_path / "set")
    tensors = load_file(str(path / "layer_0.safetensors"))
    assert set(tensors) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold"}


def test_topk_set_round_trips_with_its_k(tmp_path):
    original = random_set(activation="topk", k=5, skip=False)
    path = save_transcoder_set(original, tmp_path / "set")
    config = yaml.safe_load((path / "config.yaml").read_text())
    assert config["activation"] == "topk" and config["k"] == 5
    assert set(load_file(str(path / "layer_0.safetensors"))) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    loaded = load_transcoder_set(path)
    assert loaded.activation == "topk"
    for tc in loaded.transcoders:
        assert isinstance(tc.activation_function, TopK) and tc.activation_function.k == 5
    assert_sets_equal(original, loaded)
    x = torch.randn(6, 16)
    assert ((loaded.encode(0, x) != 0).sum(-1) <= 5).all()


def test_relu_set_round_trips_as_relu(tmp_path):
    original = random_set(activation="relu")
    loaded = load_transcoder_set(save_transcoder_set(original, tmp_path / "set"))
    assert loaded.activation == "relu"
    assert_sets_equal(original, loaded)


def test_extra_config_lands_in_config_yaml(tmp_path):
    path = save_transcoder_set(random_set(), tmp_path / "set", extra_config={"heldout_metrics": [{"fvu": 0.1}]})
    assert yaml.safe_load((path / "config.yaml").read_text())["heldout_metrics"] == [{"fvu": 0.1}]


def test_saving_over_an_existing_set_replaces_it_and_leaves_no_temp_dirs(tmp_path):
    path = tmp_path / "set"
    save_transcoder_set(random_set(n_layers=3, seed=0), path)
    replacement = random_set(n_layers=2, seed=1)
    save_transcoder_set(replacement, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no .set.tmp* / .set.old*
    assert not (path / "layer_2.safetensors").exists()  # the old set is gone, not merged
    assert_sets_equal(replacement, load_transcoder_set(path))


def test_failed_save_keeps_the_old_set_and_leaves_no_temp_dirs(tmp_path, monkeypatch):
    path = tmp_path / "set"
    original = random_set(seed=0)
    save_transcoder_set(original, path)
    calls = []

    def failing_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(tc_io, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_transcoder_set(random_set(seed=1), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert_sets_equal(original, load_transcoder_set(path))


# ------------------------------------------------------------------------------------ bad files
@pytest.fixture
def saved_set(tmp_path) -> Path:
    return save_transcoder_set(random_set(), tmp_path / "set")


def test_truncated_layer_file_is_corrupt(saved_set):
    file = saved_set / "layer_1.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="layer_1.safetensors"):
        load_transcoder_set(saved_set)


def test_missing_layer_file_is_corrupt(saved_set):
    (saved_set / "layer_1.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="layer_1.safetensors"):
        load_transcoder_set(saved_set)


@pytest.mark.parametrize("garbage", [b"", b"not a safetensors file at all" * 10, b"\xff" * 64])
def test_garbage_layer_file_is_corrupt(saved_set, garbage):
    (saved_set / "layer_0.safetensors").write_bytes(garbage)
    with pytest.raises(CorruptFileError, match="layer_0.safetensors"):
        load_transcoder_set(saved_set)


def test_layer_file_with_wrong_tensors_is_corrupt(saved_set):
    tensors = load_file(str(saved_set / "layer_0.safetensors"))
    del tensors["b_enc"]
    save_file(tensors, str(saved_set / "layer_0.safetensors"))
    with pytest.raises(CorruptFileError, match="b_enc"):
        load_transcoder_set(saved_set)
    tensors["b_enc"] = torch.zeros(7)  # wrong shape
    save_file(tensors, str(saved_set / "layer_0.safetensors"))
    with pytest.raises(CorruptFileError, match="shape"):
        load_transcoder_set(saved_set)


def test_unparseable_config_is_corrupt(saved_set):
    (saved_set / "config.yaml").write_text("transcoders: [unclosed\n")
    with pytest.raises(CorruptFileError, match="config.yaml"):
        load_transcoder_set(saved_set)


def test_unknown_set_name_lists_the_shipped_sets(tmp_path):
    with pytest.raises(UnknownNameError) as info:
        load_transcoder_set("no-such-transcoder-set")
    message = str(info.value)
    assert "no-such-transcoder-set" in message and "transcoder set" in message
    for name in shipped_sets():
        assert name in message
    assert isinstance(info.value, BadInputError)
    # a directory that holds no set is unknown too
    with pytest.raises(UnknownNameError):
        load_transcoder_set(tmp_path)


# ------------------------------------------------------------------------------------ Gemma Scope 2
def write_gemma_scope_2(root: Path, layer_dirs: list[str], d_model: int = 16, d_sae: int = 24, seed: int = 0):
    """Synthetic Gemma Scope 2 transcoders; returns each layer's raw tensors (Gemma Scope's names)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for name in layer_dirs:
        raw = {
            "w_enc": torch.randn(d_model, d_sae, generator=gen) / d_model**0.5,  # (d_model, d_sae)
            "w_dec": torch.randn(d_sae, d_model, generator=gen) / d_sae**0.5,  # (d_sae, d_model)
            "b_enc": 0.1 * torch.randn(d_sae, generator=gen),
            "b_dec": 0.1 * torch.randn(d_model, generator=gen),
            "threshold": 0.1 + 0.4 * torch.rand(d_sae, generator=gen),
            "affine_skip_connection": torch.randn(d_model, d_model, generator=gen) / d_model**0.5,
        }
        (root / name).mkdir(parents=True)
        save_file(raw, str(root / name / "params.safetensors"))
        params.append(raw)
    return params


def gemma_scope_forward(raw: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma Scope's own convention: ``pre = x @ w_enc + b_enc``, JumpReLU, ``y = a @ w_dec + b_dec + x @ A``."""
    pre = x @ raw["w_enc"] + raw["b_enc"]
    acts = torch.relu(pre) * (pre > raw["threshold"])
    return acts, acts @ raw["w_dec"] + raw["b_dec"] + x @ raw["affine_skip_connection"]


def test_gemma_scope_2_loader_matches_gemma_scope_convention(tmp_path):
    params = write_gemma_scope_2(tmp_path, ["layer_0", "layer_1"])
    transcoders = load_gemma_scope_2(tmp_path)
    assert transcoders.n_layers == 2 and transcoders.d_model == 16 and transcoders.d_transcoder(0) == 24
    assert transcoders.activation == "jumprelu"
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    for layer, raw in enumerate(params):
        tc = transcoders[layer]
        assert tc.W_enc.shape == (24, 16)  # transposed into circuit-tracer's orientation
        assert not torch.allclose(raw["affine_skip_connection"], raw["affine_skip_connection"].T)
        acts, y = gemma_scope_forward(raw, x)
        assert (acts > 0).any() and (acts == 0).any()
        torch.testing.assert_close(tc.encode(x), acts)
        torch.testing.assert_close(tc(x), y)
        torch.testing.assert_close(tc.decode(acts, x), y)


def test_load_transcoder_set_dispatches_to_gemma_scope_2(tmp_path):
    params = write_gemma_scope_2(tmp_path / "gs2", ["layer_0", "layer_1"])
    assert not (tmp_path / "gs2" / "config.yaml").exists()
    transcoders = load_transcoder_set(tmp_path / "gs2")
    x = torch.randn(4, 16)
    for layer, raw in enumerate(params):
        torch.testing.assert_close(transcoders[layer](x), gemma_scope_forward(raw, x)[1])


def test_gemma_scope_2_layers_sort_numerically(tmp_path):
    names = [f"transcoder/layer_{i}_width_16k_l0_small" for i in range(12)]
    params = write_gemma_scope_2(tmp_path, names, d_model=4, d_sae=6)
    transcoders = load_gemma_scope_2(tmp_path / "transcoder")
    assert transcoders.n_layers == 12
    for layer, raw in enumerate(params):  # layer_10 comes after layer_9, not after layer_1
        assert torch.equal(transcoders[layer].W_dec, raw["w_dec"])


def test_a_set_directory_is_what_it_names_not_what_lies_below(tmp_path):
    # a Gemma Scope 2 set deep inside the named directory (as anywhere under /tmp) is not that directory
    write_gemma_scope_2(tmp_path / "unrelated" / "deep" / "set", ["layer_0"])
    with pytest.raises(UnknownNameError) as info:
        load_transcoder_set(tmp_path)
    assert str(tmp_path) in str(info.value) and "unrelated" not in str(info.value)
    assert load_transcoder_set(tmp_path / "unrelated" / "deep" / "set").n_layers == 1


def test_two_gemma_scope_2_variants_of_a_layer_are_refused(tmp_path):
    write_gemma_scope_2(tmp_path, ["layer_0_width_16k_l0_small", "layer_0_width_16k_l0_big", "layer_1_width_16k_l0_small"])
    with pytest.raises(BadInputError, match="layer 0 .*l0_big.*l0_small|layer 0 .*l0_small.*l0_big"):
        load_transcoder_set(tmp_path)


def test_gemma_scope_2_file_with_missing_tensor_is_corrupt(tmp_path):
    write_gemma_scope_2(tmp_path, ["layer_0"])
    file = tmp_path / "layer_0" / "params.safetensors"
    raw = load_file(str(file))
    del raw["threshold"]
    save_file(raw, str(file))
    with pytest.raises(CorruptFileError, match="threshold"):
        load_transcoder_set(tmp_path)


def test_a_set_recorded_for_another_model_is_used_with_a_warning(tiny_adapter, make_tiny_transcoders, caplog):
    """Right shapes, another model in the set's config: accepted (a base model's set on a fine-tune is
    a technique), but said; the set of the model itself, or one that records no model, is not."""
    import logging

    from mechscope.replacement.replacement_model import ReplacementModel

    adapter = tiny_adapter("llama")
    transcoders = make_tiny_transcoders(adapter)
    for recorded, warned in ((None, False), (adapter.name, False), ("some-org/another-model", True)):
        transcoders.model_name = recorded
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mechscope.replacement.replacement_model"):
            ReplacementModel(adapter, transcoders)
        assert any("another-model" in r.getMessage() for r in caplog.records) == warned, recorded
