"""Transcoder sets from the Hugging Face hub, tested offline on a hub cache laid out as
``huggingface_hub`` lays it out (``models--ORG--REPO/{refs/main, snapshots/<sha>/...}``) with
``HF_HUB_OFFLINE`` on: circuit-tracer configs (``hf://`` layer URIs, CLTs in a subfolder), Gemma Scope 2
subfolders, sparsify hookpoint folders; a set missing from the cache names the cache and the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import TINY_PROMPT, make_tiny_adapter, make_tiny_clt, make_tiny_transcoders
from mechscope.errors import BadInputError
from mechscope.transcoders.hub import looks_like_hub_id, parse_hub_ref
from mechscope.transcoders.io import load_transcoder_set, save_transcoder_set


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline hub cache; ``add(repo, files_dir, subfolder)`` lays a repository into it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo: str, source: Path, subfolder: str = "") -> Path:
        root = cache / f"models--{repo.replace('/', '--')}"
        sha = hashlib.sha1(repo.encode()).hexdigest()
        snapshot = root / "snapshots" / sha / subfolder
        shutil.copytree(source, snapshot, dirs_exist_ok=True)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(sha)
        return snapshot

    add.cache = cache
    return add


def _same_encoding(a, b, adapter) -> None:
    x = adapter.run_with_mlp_sites(adapter.tokenize(TINY_PROMPT)[None])[0]
    for layer in range(adapter.n_layers):
        xs = x[layer][0].float()
        assert torch.allclose(a.encode(layer, xs), b.encode(layer, xs), atol=1e-5)
        assert torch.allclose(a.reconstruct([a.encode(l, x[l][0].float()) for l in range(adapter.n_layers)],
                                            [v[0].float() for v in x])[layer],
                              b.reconstruct([b.encode(l, x[l][0].float()) for l in range(adapter.n_layers)],
                                            [v[0].float() for v in x])[layer], atol=1e-5)


def test_references_parse():
    assert parse_hub_ref("mntss/clt-gemma-2-2b-426k") == parse_hub_ref("hf://mntss/clt-gemma-2-2b-426k")
    ref = parse_hub_ref("google/gemma-scope-2-270m-pt//transcoder_all/width_16k@abc123")
    assert (ref.repo_id, ref.subfolder, ref.revision) == ("google/gemma-scope-2-270m-pt", "transcoder_all/width_16k", "abc123")
    assert parse_hub_ref("org/repo/sub") == parse_hub_ref("org/repo//sub")
    assert looks_like_hub_id("org/repo") and not looks_like_hub_id("./org/repo") and not looks_like_hub_id("plain-name")
    with pytest.raises(BadInputError, match="not a hub reference"):
        parse_hub_ref("no slash here")


def test_a_circuit_tracer_config_with_hf_uris_loads_offline(hub, tmp_path):
    adapter = make_tiny_adapter("llama")
    tcs = make_tiny_transcoders(adapter, skip=True)
    save_transcoder_set(tcs, tmp_path / "files")  # layer_{i}.safetensors + config.yaml
    hub("org/layer-files", tmp_path / "files")
    config = yaml.safe_load((tmp_path / "files" / "config.yaml").read_text())
    config["transcoders"] = [f"hf://org/layer-files/layer_{i}.safetensors" for i in range(adapter.n_layers)]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text(yaml.safe_dump(config))
    hub("org/ct-set", tmp_path / "cfg")
    loaded = load_transcoder_set("org/ct-set")
    assert loaded.scan == "org/ct-set" or loaded.scan == config.get("scan")
    _same_encoding(tcs, loaded, adapter)


def test_a_clt_in_a_subfolder_and_a_gemma_scope_2_subfolder_load_offline(hub, tmp_path):
    from test_transcoders import write_gemma_scope_2

    from mechscope.transcoders.clt_io import save_clt

    adapter = make_tiny_adapter("llama")
    clt = make_tiny_clt(adapter, skip=True)
    save_clt(clt, tmp_path / "clt" / "width_32")
    hub("org/clt-tiny", tmp_path / "clt")
    loaded = load_transcoder_set("org/clt-tiny//width_32")
    assert loaded.kind == "cross-layer" and loaded.scan == clt.scan  # its config names it
    _same_encoding(clt, loaded, adapter)

    write_gemma_scope_2(tmp_path / "gs2" / "transcoder", ["layer_0_width_16k_l0_small", "layer_1_width_16k_l0_small"])
    hub("google/gemma-scope-2-tiny-pt", tmp_path / "gs2")
    gs2 = load_transcoder_set("google/gemma-scope-2-tiny-pt//transcoder")
    assert gs2.n_layers == 2 and gs2.d_model == 16 and gs2.scan == "google/gemma-scope-2-tiny-pt//transcoder"


def test_sparsify_hookpoint_folders_load_offline_and_trace(hub, tmp_path):
    from mechscope.attribution.attribute import AttributionConfig, attribute
    from mechscope.replacement.replacement_model import ReplacementModel

    adapter = make_tiny_adapter("llama")
    tcs = make_tiny_transcoders(adapter, activation="topk", k=6, skip=True)
    for layer, tc in enumerate(tcs.transcoders):
        folder = tmp_path / "sparsify" / f"layers.{layer}.mlp"
        folder.mkdir(parents=True)
        save_file({"encoder.weight": tc.W_enc.detach().clone(), "encoder.bias": tc.b_enc.detach().clone(),
                   "W_dec": tc.W_dec.detach().clone(), "b_dec": tc.b_dec.detach().clone(),
                   "W_skip": tc.W_skip.detach().clone()}, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"d_in": adapter.d_model, "num_latents": tc.d_transcoder, "k": 6,
                                                     "transcode": True, "skip_connection": True}))
    hub("EleutherAI/tiny-transcoders", tmp_path / "sparsify")
    loaded = load_transcoder_set("EleutherAI/tiny-transcoders")
    assert loaded.activation == "topk"
    _same_encoding(tcs, loaded, adapter)
    graph = attribute(ReplacementModel(adapter, loaded), TINY_PROMPT, AttributionConfig(max_feature_nodes=20))
    assert graph.transcoder_set == "EleutherAI/tiny-transcoders" and graph.n_features == 20
    # an autoencoder is not a transcoder
    cfg = tmp_path / "sparsify" / "layers.1.mlp" / "cfg.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "transcode": False}))
    hub("EleutherAI/tiny-saes", tmp_path / "sparsify")
    with pytest.raises(BadInputError, match="sparse autoencoder"):
        load_transcoder_set("EleutherAI/tiny-saes")


def test_a_set_missing_from_the_offline_cache_names_the_cache_and_the_file(hub, tmp_path, capsys):
    with pytest.raises(BadInputError) as info:
        load_transcoder_set("mntss/clt-gemma-2-2b-426k")
    message = str(info.value)
    assert str(hub.cache) in message and "mntss/clt-gemma-2-2b-426k/config.yaml" in message and "HF_HUB_OFFLINE" in message
    # a config whose layer URIs are not cached names the missing layer
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text(yaml.safe_dump(
        {"model_kind": "transcoder_set", "transcoders": ["hf://org/gone/layer_0.safetensors"]}))
    hub("org/half-cached", tmp_path / "cfg")
    with pytest.raises(BadInputError, match="org/gone/layer_0.safetensors is not in the Hugging Face cache"):
        load_transcoder_set("org/half-cached")
    from test_cli import run

    adapter = make_tiny_adapter("llama")
    adapter.hf.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    code, out, err = run(["trace", "a cat", "--model", str(tmp_path / "model"), "--transcoders", "org/absent",
                          "--out", str(tmp_path / "graphs")], capsys)
    assert code == 2 and "org/absent/config.yaml is not in the Hugging Face cache" in err
    assert not (tmp_path / "graphs").exists()
