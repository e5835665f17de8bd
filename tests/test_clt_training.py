"""Training a cross-layer transcoder: it learns, resumes exactly, and saves a CLT that loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_training import (  # noqa: F401  (fixtures)
    corpus,
    llama,
    stop_after_first_checkpoint,
    streams,
    tiny_train_config,
    tokenizer,
)

from mechscope.training import clt_trainer
from mechscope.training.clt_trainer import train_clt
from mechscope.training.trainer import evaluate_transcoders
from mechscope.transcoders.io import load_transcoder_set
from mechscope.transcoders.transcoder import CrossLayerTranscoderSet


def run(adapter, streams, cfg, out, ckpt):  # noqa: F811
    return train_clt(adapter, streams[0], streams[1], cfg, out, ckpt, progress=False)


def test_clt_training_lowers_heldout_fvu_and_saves_a_clt(llama, streams, tmp_path):  # noqa: F811
    cfg = tiny_train_config()
    untrained_cfg = tiny_train_config(lr=1e-9)  # the same run, learning nothing
    _, before = run(llama, streams, untrained_cfg, tmp_path / "u", tmp_path / "cu")
    clt, after = run(llama, streams, cfg, tmp_path / "set", tmp_path / "c")
    assert len(after) == llama.n_layers
    for b, a in zip(before, after):
        assert a.fvu < 0.8 * b.fvu and 0 < a.l0 < cfg.d_transcoder, (b, a)
    loaded = load_transcoder_set(tmp_path / "set")
    assert isinstance(loaded, CrossLayerTranscoderSet) and loaded.n_layers == llama.n_layers
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder" and config["training"]["tokens_trained"] == cfg.n_tokens
    again = evaluate_transcoders(llama, loaded, streams[1], cfg.eval_sequences, cfg.batch_sequences, storage_dtype=None)
    assert [m.fvu for m in again] == pytest.approx([m.fvu for m in after], abs=1e-3)  # the figures describe the file


def test_interrupted_clt_training_resumes_exactly(llama, streams, tmp_path, monkeypatch):  # noqa: F811
    cfg = tiny_train_config(n_tokens=1200, checkpoint_every_s=0.0)
    a, metrics = run(llama, streams, cfg, tmp_path / "a", tmp_path / "ca")
    stop_after_first_checkpoint(monkeypatch, clt_trainer)
    with pytest.raises(KeyboardInterrupt):
        run(llama, streams, cfg, tmp_path / "b", tmp_path / "cb")
    assert json.loads((tmp_path / "cb" / "checkpoint" / "state.json").read_text())["step"] == cfg.minibatches
    monkeypatch.undo()
    b, resumed = run(llama, streams, cfg, tmp_path / "b", tmp_path / "cb")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert [m.fvu for m in resumed] == pytest.approx([m.fvu for m in metrics], abs=1e-6)


def test_the_auxk_loss_reaches_dead_features_only_when_it_is_on(llama):
    """A dead feature (no firing for ``dead_after_tokens``) is never in the TopK code, so only the AuxK
    term gives its encoder and decoder a gradient; with ``aux_coef`` 0 they get none."""
    from mechscope.training.clt_trainer import CLTTrainee
    from mechscope.training.trainer import _activations

    ids = llama.tokenize("a cat sat on the mat and the dog ran far away")[None].repeat(2, 1)
    xs, ys = _activations(llama, ids.numpy())
    grads = {}
    for coef in (0.0, 1 / 32):
        cfg = tiny_train_config(d_transcoder=32, k=4, aux_k=8, aux_coef=coef, dead_after_tokens=10)
        trainee = CLTTrainee(llama.n_layers, llama.d_model, cfg, torch.Generator().manual_seed(0))
        trainee.initialize(xs, ys)
        codes, _, _ = trainee.forward_topk([x / trainee.in_scale[m] for m, x in enumerate(xs)])
        chosen = torch.zeros(32, dtype=torch.bool)
        chosen[codes[0][0].flatten()] = True
        dead = ~chosen
        assert dead.sum() >= 8
        trainee.last_fired[0, dead] = 100  # dead at layer 0
        loss, _, _ = trainee.loss(xs, ys)
        loss.backward()
        grads[coef] = (trainee.W_enc[0].grad[dead].abs().sum(), trainee.W_dec[0].grad[dead].abs().sum())
    assert float(grads[0.0][0]) == 0 and float(grads[0.0][1]) == 0
    assert float(grads[1 / 32][0]) > 0 and float(grads[1 / 32][1]) > 0
