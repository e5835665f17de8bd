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


@pytest.mark.parametrize("method", ["topk", "jumprelu"])
def test_interrupted_clt_training_resumes_exactly(llama, streams, tmp_path, monkeypatch, method):  # noqa: F811
    cfg = tiny_train_config(n_tokens=1200, checkpoint_every_s=0.0, resample_every=2, dead_after_tokens=30,
                            resample_until=0.9, method=method)  # TopK: resampling included
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


def _trainee_and_batch(llama, **overrides):  # noqa: F811
    from mechscope.training.clt_trainer import CLTTrainee
    from mechscope.training.trainer import _activations

    ids = llama.tokenize("a cat sat on the mat and the dog ran far away")[None].repeat(2, 1)
    xs, ys = _activations(llama, ids.numpy())
    cfg = tiny_train_config(d_transcoder=32, k=4, **overrides)
    trainee = CLTTrainee(llama.n_layers, llama.d_model, cfg, torch.Generator().manual_seed(0))
    trainee.initialize(xs, ys)
    with torch.no_grad():
        for b in trainee.b_enc:
            b.normal_(0, 0.5)  # features fire at initialisation too
    return trainee, xs, ys


@pytest.mark.parametrize("method", ["topk", "jumprelu"])
def test_the_clt_reconstruction_sums_each_earlier_layers_decoder_block(llama, method):  # noqa: F811
    """The batched decode (each source layer decoded once into all its output layers, summed by
    one autograd function) is the CLT's definition written pair by pair: output layer m = b_dec[m]
    + sum_{l <= m} a_l W_dec[l][:, m - l] + W_skip[m] x_m, in normalised units; so are the gradients
    it passes to every parameter."""
    import torch.nn.functional as F

    trainee, xs, _ = _trainee_and_batch(llama, method=method)
    xs_n = [x / trainee.in_scale[m] for m, x in enumerate(xs)]
    codes, recon, _ = trainee.forward_topk(xs_n)
    assert recon.shape == (xs[0].shape[0], llama.n_layers, llama.d_model)
    upstream = torch.randn(recon.shape, generator=torch.Generator().manual_seed(3))
    (recon * upstream).sum().backward()
    batched = {name: p.grad.clone() for name, p in trainee.named_parameters() if p.grad is not None}
    trainee.zero_grad()
    codes, _, _ = trainee.forward_topk(xs_n)  # the same codes, a fresh graph
    by_hand_all = []
    for m in range(llama.n_layers):
        by_hand = trainee.b_dec[m] + xs_n[m] @ trainee.W_skip[m].T
        for l in range(m + 1):
            if method == "topk":
                idx, vals = codes[l]
                by_hand = by_hand + F.embedding_bag(idx, trainee.W_dec[l][:, m - l].contiguous(),
                                                    per_sample_weights=vals, mode="sum")
            else:
                by_hand = by_hand + codes[l] @ trainee.W_dec[l][:, m - l]
        torch.testing.assert_close(recon[:, m], by_hand, rtol=1e-5, atol=1e-5)
        by_hand_all.append(by_hand)
    (torch.stack(by_hand_all, 1) * upstream).sum().backward()
    assert batched.keys() >= {"W_dec.0", "W_enc.0", "b_enc.0"}
    for name, p in trainee.named_parameters():
        if name in batched:
            torch.testing.assert_close(batched[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    fired = [v for _, v in codes] if method == "topk" else codes
    assert any(float(v.detach().abs().sum()) > 0 for v in fired)


def test_clt_resampling_reinitialises_dead_features_only(llama):  # noqa: F811
    """A dead feature of layer l gets a unit concatenated decoder along one token's residual over
    layers l.., an encoder along that token's centred input, zero bias, zero Adam moments and a fresh
    firing count; live features keep everything."""
    trainee, xs, ys = _trainee_and_batch(llama, dead_after_tokens=10)
    opt = torch.optim.Adam(trainee.parameters(), lr=1e-3)
    loss, _, _ = trainee.loss(xs, ys)
    loss.backward()
    opt.step()
    dead = torch.zeros(llama.n_layers, 32, dtype=torch.bool)
    dead[0, :5] = True
    dead[-1, 10:12] = True
    trainee.last_fired[dead] = 100
    before = {name: p.detach().clone() for name, p in trainee.named_parameters()}
    xs_n = [x / trainee.in_scale[m] for m, x in enumerate(xs)]
    y_all = torch.stack([y / trainee.out_scale[m] for m, y in enumerate(ys)], dim=1)
    with torch.no_grad():
        residual = y_all - trainee.forward_topk(xs_n)[1]  # under the weights before resampling
    counts = trainee.resample_dead(xs, ys, opt, torch.Generator().manual_seed(1))
    assert counts == [int(d.sum()) for d in dead]
    for l in range(llama.n_layers):
        W_dec, W_enc = trainee.W_dec[l], trainee.W_enc[l]
        torch.testing.assert_close(W_dec[~dead[l]], before[f"W_dec.{l}"][~dead[l]], rtol=0, atol=0)
        torch.testing.assert_close(W_enc[~dead[l]], before[f"W_enc.{l}"][~dead[l]], rtol=0, atol=0)
        if not dead[l].any():
            continue
        flat = W_dec[dead[l]].flatten(1)
        torch.testing.assert_close(flat.norm(dim=1), torch.ones(len(flat)))
        assert (trainee.b_enc[l][dead[l]] == 0).all() and (trainee.last_fired[l, dead[l]] == 0).all()
        assert (opt.state[W_dec]["exp_avg"][dead[l]] == 0).all() and (opt.state[W_enc]["exp_avg_sq"][dead[l]] == 0).all()
        assert (opt.state[W_dec]["exp_avg"][~dead[l]] != 0).any()
        # each new decoder is the direction of some token's residual over layers l.., its encoder that
        # of the same token's centred input
        tails = residual[:, l:].flatten(1)
        dec_cos = flat @ (tails / tails.norm(dim=1, keepdim=True)).T
        assert (dec_cos.max(dim=1).values > 1 - 1e-4).all()
        enc_dirs = W_enc[dead[l]] / W_enc[dead[l]].norm(dim=1, keepdim=True)
        centred = xs_n[l] - xs_n[l].mean(0)
        cos = enc_dirs @ (centred / centred.norm(dim=1, keepdim=True)).T
        assert (cos.max(dim=1).values > 1 - 1e-4).all()
        assert torch.equal(cos.argmax(dim=1), dec_cos.argmax(dim=1))


def test_the_jumprelu_straight_through_gradients_are_the_rectangle_kernels():
    """Forward h 1[h > theta]; backward: da/dh = 1[h > theta] + theta K, da/dtheta = -theta K, with
    K = 1[|h - theta| < eps / 2] / eps (Rajamanoharan et al. 2024; the jump passes gradient to h too)."""
    from mechscope.training.clt_trainer import JumpReLUSTE

    h = torch.tensor([[0.0, 0.28, 0.31, 0.5], [0.33, 0.2, 0.36, -1.0]], requires_grad=True)
    theta = torch.tensor([0.3, 0.3, 0.3, 0.3], requires_grad=True)
    a = JumpReLUSTE.apply(h, theta, 0.1)
    torch.testing.assert_close(a, torch.tensor([[0.0, 0.0, 0.31, 0.5], [0.33, 0.0, 0.36, 0.0]]))
    grad = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    a.backward(grad)
    near = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # |h - 0.3| < 0.05
    above = (h > theta).float()
    torch.testing.assert_close(h.grad, grad * above + grad * 0.3 * near / 0.1)
    torch.testing.assert_close(theta.grad, -(grad * 0.3 * near / 0.1).sum(0))


def test_jumprelu_clt_training_learns_and_its_sparsity_penalty_sets_l0(llama, streams, tmp_path):  # noqa: F811
    """The JumpReLU + tanh objective lowers held-out FVU, saves its learned thresholds, and a larger
    sparsity weight gives fewer active features."""
    _, untrained = run(llama, streams, tiny_train_config(method="jumprelu", lr=1e-9, threshold_init=0.05),
                       tmp_path / "u", tmp_path / "cu")
    l0 = {}
    for coef in (0.0, 0.05):
        cfg = tiny_train_config(method="jumprelu", sparsity_coef=coef, threshold_init=0.05, bandwidth=0.1)
        clt, metrics = run(llama, streams, cfg, tmp_path / f"set{coef}", tmp_path / f"c{coef}")
        assert all(a.fvu < 0.8 * b.fvu for a, b in zip(metrics, untrained)), (metrics, untrained)
        config = yaml.safe_load((tmp_path / f"set{coef}" / "config.yaml").read_text())
        assert config["training"]["method"].startswith("CLT: JumpReLU")
        thresholds = [clt.activation_functions[l].threshold for l in range(llama.n_layers)]
        assert not all(torch.allclose(t, torch.full_like(t, 0.05)) for t in thresholds)  # learned
        l0[coef] = sum(m.l0 for m in metrics) / len(metrics)
    assert l0[0.05] < 0.7 * l0[0.0], l0


def test_low_precision_decoder_product_is_the_product_of_rounded_operands():
    """bfloat16 decoder products: forward and both gradients are float64 products of the
    bfloat16-rounded operands, rounded once more to bfloat16 (CPU matmuls return their operands'
    dtype: within 2^-8 relative), and stay near the float32 ones."""
    from mechscope.training.clt_trainer import _LowPrecisionProduct

    g = torch.Generator().manual_seed(0)
    a = (torch.randn(37, 24, generator=g).relu()).requires_grad_()
    W = torch.randn(24, 50, generator=g, requires_grad=True)
    grad = torch.randn(37, 50, generator=g)
    out = _LowPrecisionProduct.apply(a, W, W.detach().bfloat16())
    assert out.dtype == torch.float32
    out.backward(grad)
    a16, W16, g16 = (t.detach().bfloat16().double() for t in (a, W, grad))
    torch.testing.assert_close(out.double(), a16 @ W16, atol=1e-6, rtol=2**-8)
    torch.testing.assert_close(a.grad.double(), g16 @ W16.T, atol=1e-6, rtol=2**-8)
    torch.testing.assert_close(W.grad.double(), a16.T @ g16, atol=1e-6, rtol=2**-8)
    exact, out = a.detach() @ W.detach(), out.detach()
    assert float((out - exact).abs().max()) < 2e-2 * float(exact.abs().max())
    assert float((out - exact).abs().max()) > 0  # it did round


def test_bfloat16_decoder_products_train_like_float32(llama, streams, tmp_path):  # noqa: F811
    """The same JumpReLU run with bfloat16 decoder products reaches the float32 run's held-out FVU
    (within 5 %), and the rounded decoder follows every optimizer step (a stale copy would train
    on old weights)."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_train_config(method="jumprelu", threshold_init=0.05, decoder_dtype=dtype)
        _, metrics = run(llama, streams, cfg, tmp_path / dtype, tmp_path / f"c{dtype}")
        results[dtype] = sum(m.fvu for m in metrics) / len(metrics)
    assert results["bfloat16"] == pytest.approx(results["float32"], rel=0.05), results

    cfg = tiny_train_config(method="jumprelu", decoder_dtype="bfloat16")
    trainee = clt_trainer.CLTTrainee(2, 8, cfg, torch.Generator().manual_seed(0))
    a = torch.rand(5, cfg.d_transcoder)
    first = trainee._decode(0, a)
    with torch.no_grad():
        trainee.W_dec[0].mul_(2.0)  # what an optimizer step does: an in-place update
    torch.testing.assert_close(trainee._decode(0, a), 2 * first)


def test_decoder_dtype_is_checked():
    from mechscope.errors import BadInputError
    from mechscope.training.trainer import TrainConfig

    with pytest.raises(BadInputError, match="decoder_dtype must be 'float32' or 'bfloat16', got 'float16'"):
        TrainConfig(decoder_dtype="float16")
