"""Devices: ``--device`` / ``--dtype`` / ``--device-map`` resolve or fail clearly, and on an accelerator
(CUDA or MPS, when this machine has one: ``benchmarks/gpu_check.sh`` runs these there) the pipeline
gives the CPU's graphs, interventions and training steps to float tolerance."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import TINY_PROMPT, make_tiny_adapter, make_tiny_transcoders
from mechscope.devices import available_devices, check_device_map, layer_devices, resolve_device, resolve_dtype
from mechscope.errors import BadInputError

# MECHSCOPE_TEST_DEVICES=cpu runs the accelerator tests against the CPU itself (a check of the tests)
ACCELERATORS = (os.environ["MECHSCOPE_TEST_DEVICES"].split(",") if os.environ.get("MECHSCOPE_TEST_DEVICES")
                else [d for d in ("cuda", "mps") if d in {a.split(":")[0] for a in available_devices()}])


def test_auto_is_cuda_when_present_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    assert available_devices()[0] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_missing_device_names_what_is_there():
    for spec in ("cuda", "cuda:3"):
        with pytest.raises(BadInputError, match=r"not available on this machine .*available: auto, cpu"):
            resolve_device(spec)
    with pytest.raises(BadInputError, match="not a device name; choose from auto, cpu"):
        resolve_device("banana")
    with pytest.raises(BadInputError, match="runs on cpu, cuda and mps"):
        resolve_device("meta")
    with pytest.raises(BadInputError, match="spreads a model over GPUs; this machine has none"):
        check_device_map("auto")
    if "mps" not in available_devices():
        with pytest.raises(BadInputError, match="'mps' is not available"):
            resolve_device("mps")


def test_dtypes_and_device_map_values():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(BadInputError, match="choose from float32, bfloat16, float16"):
        resolve_dtype("int8")
    with pytest.raises(BadInputError, match="choose auto"):
        check_device_map("balanced")
    assert check_device_map(None) is None


def test_layer_devices_read_a_device_map():
    adapter = make_tiny_adapter("llama")
    assert layer_devices(adapter.hf, adapter.n_layers) == [torch.device("cpu")] * adapter.n_layers
    hf = copy.copy(adapter.hf)
    hf.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu"}
    assert layer_devices(hf, 2) == [torch.device("cuda:0"), torch.device("cpu")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_rejects_a_missing_device_before_writing(tmp_path, capsys):
    from test_cli import run

    adapter = make_tiny_adapter("llama")
    adapter.hf.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    base = ["--model", str(tmp_path / "model")]
    for argv in (["trace", "a cat", *base, "--device", "cuda:1", "--out", str(tmp_path / "out")],
                 ["trace", "a cat", *base, "--device-map", "auto", "--out", str(tmp_path / "out")],
                 ["sweep", "a cat", *base, "--device", "cuda", "--samples", "1"],
                 ["train", *base, "--device", "cuda", "--out", str(tmp_path / "out")]):
        code, out, err = run(argv, capsys)
        assert code == 2 and ("available: auto, cpu" in err or "has none" in err), err
        assert not (tmp_path / "out").exists()
    code, out, err = run(["trace", "a cat", *base, "--device", "tpu", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "'tpu'" in err


def test_load_model_and_replacement_model_place_the_set_on_the_models_device(tmp_path):
    from mechscope.models.loading import load_model
    from mechscope.replacement.replacement_model import ReplacementModel

    adapter = make_tiny_adapter("llama")
    adapter.hf.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    model = load_model(str(tmp_path / "model"), dtype="bfloat16", device="cpu")
    assert model.device.type == "cpu" and model.dtype is torch.bfloat16
    rm = ReplacementModel(model, make_tiny_transcoders(adapter))
    assert {p.device for p in rm.transcoders.parameters()} == {model.device}


# --------------------------------------------------------------------- on an accelerator, when there is one
@pytest.fixture(params=ACCELERATORS or [pytest.param("none", marks=pytest.mark.skip(reason="no CUDA or MPS device"))])
def accelerator(request) -> torch.device:
    return resolve_device(request.param)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_graph_on_the_accelerator_equals_the_cpu_graph(accelerator, family):
    from mechscope.attribution.attribute import AttributionConfig, attribute
    from mechscope.replacement.replacement_model import ReplacementModel

    cpu = make_tiny_adapter(family)
    tcs = make_tiny_transcoders(cpu, skip=True)
    config = AttributionConfig(max_feature_nodes=None, batch_size=16)
    reference = attribute(ReplacementModel(cpu, tcs), TINY_PROMPT, config)
    device_model = make_tiny_adapter(family)
    device_model.hf.to(accelerator)
    graph = attribute(ReplacementModel(device_model, copy.deepcopy(tcs)), TINY_PROMPT, config)
    assert graph.adjacency.device.type == "cpu" and graph.config["device"].startswith(accelerator.type)
    assert torch.equal(graph.active_features, reference.active_features)
    scale = reference.adjacency.abs().max()
    assert float((graph.adjacency - reference.adjacency).abs().max() / scale) <= 1e-4


def test_interventions_on_the_accelerator_equal_the_cpu_ones(accelerator):
    from mechscope.interventions.intervene import InterventionConfig, run_interventions
    from mechscope.interventions.records import FeatureTarget, Intervention
    from mechscope.replacement.replacement_model import ReplacementModel

    cpu = make_tiny_adapter("llama")
    tcs = make_tiny_transcoders(cpu, skip=True)
    rm_cpu = ReplacementModel(cpu, tcs)
    ids = rm_cpu.tokenize(TINY_PROMPT)
    trace = rm_cpu.trace(ids)
    layer, pos, feature = (int(v) for v in trace.active[0])
    edits = [Intervention(FeatureTarget(layer, feature, (pos,)), "scale", -10.0)]
    config = InterventionConfig(generate=3)
    reference = run_interventions(rm_cpu, ids, edits, config)
    device_model = make_tiny_adapter("llama")
    device_model.hf.to(accelerator)
    result = run_interventions(ReplacementModel(device_model, copy.deepcopy(tcs)), ids, edits, config)
    assert torch.allclose(result.intervened_logits.cpu(), reference.intervened_logits, atol=1e-4)
    assert result.intervened_continuation == reference.intervened_continuation


def test_training_steps_on_the_accelerator_equal_the_cpu_ones(accelerator, tmp_path):
    from safetensors.torch import load_file
    from test_training import CTX_LEN, make_tiny_tokenizer, tiny_train_config, write_sources

    from mechscope.data.corpus import CorpusConfig, TokenStream, build_corpus
    from mechscope.training.trainer import train_transcoders

    txt, jsonl, _ = write_sources(tmp_path / "raw")
    corpus = build_corpus(CorpusConfig(sources=(str(txt), str(jsonl)), weights=(4.0, 1.0), heldout_every=3),
                          out=tmp_path / "built")
    tok = make_tiny_tokenizer()
    streams = TokenStream(corpus, tok, CTX_LEN, "train"), TokenStream(corpus, tok, CTX_LEN, "heldout")
    cfg = tiny_train_config(n_tokens=240, resample_every=0)
    train_transcoders(make_tiny_adapter("llama"), *streams, cfg, tmp_path / "cpu", tmp_path / "ck-cpu", progress=False)
    on_device = make_tiny_adapter("llama")
    on_device.hf.to(accelerator)
    train_transcoders(on_device, *streams, cfg, tmp_path / "dev", tmp_path / "ck-dev", progress=False)
    a = load_file(str(tmp_path / "ck-cpu" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "ck-dev" / "checkpoint" / "state.safetensors"))
    for name, value in a.items():
        assert torch.allclose(value, b[name], rtol=1e-4, atol=1e-5), name


def test_chat_transcripts_are_sampled_on_the_accelerator(accelerator, tmp_path, monkeypatch, capsys):
    """``corpus chat --device``: the tiny ChatML model samples its replies on the accelerator, the
    device kind is recorded with the transcripts, and a resume on another kind is refused."""
    import json

    from conftest import make_tiny_chat_adapter
    from test_cli import run
    from test_training import write_sources

    from mechscope.data.corpus import CorpusConfig, build_corpus

    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))
    txt, jsonl, _ = write_sources(tmp_path / "raw")
    build_corpus(CorpusConfig(sources=(str(txt), str(jsonl))), out=tmp_path / "home" / "corpus" / "default")
    chat = make_tiny_chat_adapter()
    chat.hf.save_pretrained(tmp_path / "chat")
    chat.tokenizer.save_pretrained(tmp_path / "chat")
    args = ["corpus", "chat", "--model", str(tmp_path / "chat"), "--name", "c", "--conversations", "6",
            "--batch-size", "3", "--max-new-tokens", "4", "--no-progress"]
    code, out, err = run([*args, "--device", str(accelerator)], capsys)
    assert code == 0, err
    parts = tmp_path / "home" / "corpus" / "c" / "chat-parts"
    assert json.loads((parts / "config.json").read_text())["device"] == accelerator.type
    rows = [json.loads(line) for part in sorted(parts.glob("0*.jsonl")) for line in part.open()]
    assert len(rows) == 6 and all(r["messages"][1]["role"] == "assistant" for r in rows)
    if accelerator.type != "cpu":
        (parts / "00001.jsonl").unlink()
        code, out, err = run([*args, "--device", "cpu"], capsys)
        assert code == 2 and "device" in err


def test_models_load_without_hub_kernels(tmp_path, monkeypatch):
    """transformers >= 5 swaps in hub kernels by default where the `kernels` package is installed and
    fails where it is not (seen on a GPU machine); mechscope loads the model's own modules either way."""
    import transformers.modeling_utils as modeling_utils

    from mechscope.models.loading import load_model

    adapter = make_tiny_adapter("llama")
    adapter.hf.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(modeling_utils, "is_kernels_available", lambda: False)
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    model = load_model(str(tmp_path / "model"), device="cpu")
    assert model.hf.use_kernels is False
    assert torch.equal(model.hf.model.layers[0].mlp.down_proj.weight, adapter.hf.model.layers[0].mlp.down_proj.weight)
