"""Golden checks of the on-disk layout circuit-tracer 0.5.0 (PyPI) reads and writes.

circuit-tracer is not installed here; each requirement below was read from its source and checked
against the real package in a separate virtualenv (mechscope sets opened there with zero difference
for JumpReLU, JumpReLU + skip and ReLU; its sets opened here with zero difference). The comment on
each check names the circuit-tracer function it comes from.

How circuit-tracer opens a local set: ``load_transcoder_from_hub("/absolute/dir")`` (which
``ReplacementModel.from_pretrained(model, transcoder_set=...)`` and ``circuit-tracer attribute -t``
call). ``caching.get_cached_path`` joins the cache root with the reference, so an absolute path
points at the directory itself; ``is_cached`` then sees its ``config.yaml`` and
``load_transcoders_from_cache`` globs the layer files. A relative path is taken for a Hub id.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import random_set as make_random_set

from mechscope.errors import CorruptFileError
from mechscope.transcoders.io import load_transcoder_set, save_transcoder_set
from mechscope.transcoders.transcoder import PerLayerTranscoderSet

D_MODEL, D_TRANSCODER, N_LAYERS, K = 16, 24, 3, 4

#: (activation, skip_connection) of every kind of set compared against circuit-tracer
KINDS = [("jumprelu", False), ("jumprelu", True), ("relu", False), ("topk", False), ("topk", True)]


def random_set(activation: str, skip: bool, seed: int = 0) -> PerLayerTranscoderSet:
    """A random set of this file's shape, named for the model circuit-tracer would trace."""
    return make_random_set(N_LAYERS, D_MODEL, D_TRANSCODER, activation, skip, K, seed, model_name="google/gemma-3-270m")


def circuit_tracer_forward(
    tensors: dict[str, torch.Tensor], x: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``SingleLayerTranscoder.encode`` / ``.forward`` written out from the raw layer tensors.

    ``pre = F.linear(x, W_enc, b_enc)``; JumpReLU ``pre * (pre > threshold)``; ReLU; TopK keeps the
    ``k`` largest (``activation_functions.TopK``); ``y = acts @ W_dec + b_dec + x @ W_skip.T``.
    """
    pre = x @ tensors["W_enc"].T + tensors["b_enc"]  # (n, d_transcoder)
    if activation == "jumprelu":
        acts = pre * (pre > tensors["activation_function.threshold"])
    elif activation == "relu":
        acts = torch.relu(pre)
    else:
        idx = pre.topk(K, dim=-1).indices
        acts = pre * torch.zeros_like(pre).scatter_(-1, idx, 1.0)
    out = acts @ tensors["W_dec"] + tensors["b_dec"]  # (n, d_model)
    if "W_skip" in tensors:
        out = out + x @ tensors["W_skip"].T
    return acts, out


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(32, D_MODEL, generator=torch.Generator().manual_seed(seed))  # (n, d_model)


# ------------------------------------------------------------------------- mechscope -> circuit-tracer
@pytest.mark.parametrize(("activation", "skip"), KINDS)
def test_config_yaml_has_the_keys_circuit_tracer_reads(tmp_path, activation, skip):
    path = save_transcoder_set(random_set(activation, skip), tmp_path / "set")
    # caching.is_cached: a local set is recognised by its config.yaml
    config = yaml.safe_load((path / "config.yaml").read_text())
    # caching.load_transcoders_from_cache / hf_utils.load_transcoders: config["model_kind"]
    assert config["model_kind"] == "transcoder_set"
    # load_transcoders_from_cache: config["feature_input_hook"], config["feature_output_hook"]; the
    # values are keys of tl_nnsight_mapping's feature_hook_mapping and of the TransformerLens
    # backend's ReplacementMLP.hook_in / blocks.{l}.hook_mlp_out
    assert config["feature_input_hook"] == "mlp.hook_in"
    assert config["feature_output_hook"] == "hook_mlp_out"
    # load_transcoders_from_cache: config.get("scan", ...); hf_utils.load_transcoders: config["scan"]
    assert config["scan"] == "tiny-plt"
    # __main__ (circuit-tracer attribute): config.get("model_name") is the default --model
    assert config["model_name"] == "google/gemma-3-270m"
    # ignored by 0.5.0's local branch, kept relative so a copied or shipped set stays loadable
    assert config["transcoders"] == [f"layer_{i}.safetensors" for i in range(N_LAYERS)]
    if activation == "topk":  # read by circuit-tracer main's load_transcoder_set(activation=, k=)
        assert (config["activation"], config["k"]) == ("topk", K)


@pytest.mark.parametrize(("activation", "skip"), KINDS)
def test_layer_files_are_named_and_shaped_as_circuit_tracer_loads_them(tmp_path, activation, skip):
    path = save_transcoder_set(random_set(activation, skip), tmp_path / "set")
    # load_transcoders_from_cache: glob("layer_*.safetensors"), layer = int(stem.split("_")[1]);
    # TranscoderSet.__init__ asserts the layers are exactly 0..max
    layer_files = sorted(path.glob("layer_*.safetensors"))
    assert sorted(int(f.stem.split("_")[1]) for f in layer_files) == list(range(N_LAYERS))
    for file in layer_files:
        tensors = load_file(str(file))
        # load_relu_transcoder: strict load_state_dict into SingleLayerTranscoder, so exactly these
        # keys; a threshold is what makes it build JumpReLU (else F.relu)
        expected = {"W_enc", "W_dec", "b_enc", "b_dec"}
        expected |= {"activation_function.threshold"} if activation == "jumprelu" else set()
        expected |= {"W_skip"} if skip else set()
        assert set(tensors) == expected
        # SingleLayerTranscoder.__init__ shapes; d_transcoder from b_enc, d_model from b_dec
        assert tensors["W_enc"].shape == (D_TRANSCODER, D_MODEL)  # (d_transcoder, d_model)
        assert tensors["W_dec"].shape == (D_TRANSCODER, D_MODEL)  # (d_transcoder, d_model)
        assert tensors["b_enc"].shape == (D_TRANSCODER,)
        assert tensors["b_dec"].shape == (D_MODEL,)
        if activation == "jumprelu":
            assert tensors["activation_function.threshold"].shape == (D_TRANSCODER,)
        if skip:
            assert tensors["W_skip"].shape == (D_MODEL, D_MODEL)  # applied as x @ W_skip.T
    # TranscoderSet.__init__: every layer has the same d_transcoder
    assert len({load_file(str(f))["b_enc"].shape for f in layer_files}) == 1


@pytest.mark.parametrize(("activation", "skip"), [kind for kind in KINDS if kind[0] != "topk"])
def test_saved_weights_mean_the_same_under_circuit_tracers_maths(tmp_path, activation, skip):
    original = random_set(activation, skip)
    path = save_transcoder_set(original, tmp_path / "set")
    x = inputs()
    for layer in range(N_LAYERS):
        acts, out = circuit_tracer_forward(load_file(str(path / f"layer_{layer}.safetensors")), x, activation)
        assert (acts > 0).any() and (acts == 0).any()  # features fire and stay silent: not vacuous
        torch.testing.assert_close(acts, original.encode(layer, x), rtol=0, atol=1e-6)
        torch.testing.assert_close(out, original[layer](x), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- circuit-tracer -> mechscope
def write_circuit_tracer_cache(path: Path, activation: str, skip: bool, k_in_config: bool, k_tensor: bool):
    """A set as ``caching.save_transcoders_to_cache`` leaves it: config.yaml via ``yaml.dump``, with
    ``transcoders``/``repo_id``/``subfolder`` dropped; layer files as ``SingleLayerTranscoder.to_safetensors``
    writes them.

    ``k_tensor`` adds the 0-dim int64 ``k`` that circuit-tracer's git main writes into TopK files.
    """
    source = random_set(activation, skip, seed=3)
    path.mkdir()
    config = {
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
        "model_kind": "transcoder_set",
        "model_name": "google/gemma-3-270m",
        "revision": None,
        "scan": "local/ct-set",
    }
    if k_in_config:
        config.update(activation="topk", k=K)
    (path / "config.yaml").write_text(yaml.dump(config))
    files = []
    for layer, tc in enumerate(source.transcoders):
        tensors = {key: value.contiguous() for key, value in tc.state_dict().items()}
        if k_tensor:
            tensors["k"] = torch.tensor(K)
        save_file(tensors, str(path / f"layer_{layer}.safetensors"))
        files.append(tensors)
    return files


@pytest.mark.parametrize(
    ("activation", "skip", "k_in_config", "k_tensor"),
    [
        ("jumprelu", False, False, False),
        ("jumprelu", True, False, False),
        ("relu", False, False, False),  # no `activation` key, no threshold: circuit-tracer's ReLU
        ("topk", False, True, False),
        ("topk", True, True, False),
        ("topk", False, False, True),  # circuit-tracer main: k only in the layer files
        ("topk", True, True, True),
    ],
)
def test_circuit_tracer_cache_layout_loads(tmp_path, activation, skip, k_in_config, k_tensor):
    files = write_circuit_tracer_cache(tmp_path / "ct", activation, skip, k_in_config, k_tensor)
    loaded = load_transcoder_set(tmp_path / "ct")
    assert loaded.activation == activation and loaded.n_layers == N_LAYERS
    assert loaded.model_name == "google/gemma-3-270m" and loaded.scan == "local/ct-set"
    x = inputs(seed=2)
    for layer, tensors in enumerate(files):
        assert (loaded[layer].W_skip is not None) == skip
        acts, out = circuit_tracer_forward(tensors, x, activation)
        assert (acts > 0).any() and (acts == 0).any()
        # circuit-tracer's TopK keeps a non-positive value that makes the top k; mechscope drops it
        # (rows like that are absent here, so the two agree exactly)
        assert activation != "topk" or (x @ tensors["W_enc"].T + tensors["b_enc"]).topk(K).values.min() > 0
        torch.testing.assert_close(loaded.encode(layer, x), acts, rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded[layer](x), out, rtol=0, atol=1e-6)


def test_k_in_layer_files_that_disagrees_with_config_is_corrupt(tmp_path):
    write_circuit_tracer_cache(tmp_path / "ct", "topk", False, k_in_config=True, k_tensor=True)
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    (tmp_path / "ct" / "config.yaml").write_text(yaml.dump({**config, "k": K + 1}))
    with pytest.raises(CorruptFileError, match=f"k={K}.*k={K + 1}"):
        load_transcoder_set(tmp_path / "ct")
