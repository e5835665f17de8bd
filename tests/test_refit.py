"""Least-squares decoder refit (mechscope.training.refit): exact on the fitting text, encoders kept."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_adapter, make_tiny_transcoders
from test_training import CTX_LEN, make_tiny_tokenizer, write_sources

from mechscope.data.corpus import CorpusConfig, TokenStream, build_corpus
from mechscope.errors import BadInputError
from mechscope.training.refit import refit_decoders
from mechscope.training.trainer import _activations


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("refit")
    txt, jsonl, _ = write_sources(root / "raw")
    corpus = build_corpus(CorpusConfig(sources=(str(txt), str(jsonl)), heldout_every=3), out=root / "built")
    return TokenStream(corpus, make_tiny_tokenizer(), CTX_LEN, "train")


def _sse(adapter, tcs, stream, n_sequences):
    xs, ys = _activations(adapter, next(stream.batches(n_sequences))[1])
    return [float((y - tc.decode(tc.encode(x), x)).pow(2).sum()) for tc, x, y in zip(tcs.transcoders, xs, ys)]


@pytest.mark.parametrize("skip", [True, False])
def test_refit_is_the_least_squares_decoder_and_keeps_the_encoders(stream, skip):
    torch.manual_seed(0)
    adapter = make_tiny_adapter("llama")
    tcs = make_tiny_transcoders(adapter, skip=skip)
    before = copy.deepcopy(tcs)
    n = 24
    sse_before = _sse(adapter, tcs, stream, n)
    gains = refit_decoders(adapter, tcs, stream, n, batch_sequences=8, ridge=1e-9)
    sse_after = _sse(adapter, tcs, stream, n)
    for layer, (a, b, gain) in enumerate(zip(sse_before, sse_after, gains)):
        assert b < a  # random decoders: the refit removes most of the error
        assert gain == pytest.approx((a - b) / a, rel=1e-3, abs=1e-6), layer  # the reported gain is the real one
    for old, new in zip(before.transcoders, tcs.transcoders):
        assert torch.equal(old.W_enc, new.W_enc) and torch.equal(old.b_enc, new.b_enc)
        assert torch.equal(old.activation_function.threshold, new.activation_function.threshold)
    # optimal: a small step of the decoder in any direction makes the fitting error larger
    xs, ys = _activations(adapter, next(stream.batches(n))[1])
    tc, x, y = tcs.transcoders[0], xs[0], ys[0]
    base = float((y - tc.decode(tc.encode(x), x)).pow(2).sum())
    for seed in range(3):
        nudged = copy.deepcopy(tc)
        with torch.no_grad():
            nudged.W_dec.add_(1e-3 * torch.randn(nudged.W_dec.shape, generator=torch.Generator().manual_seed(seed)))
        assert float((y - nudged.decode(nudged.encode(x), x)).pow(2).sum()) > base


def test_features_that_never_fire_keep_their_decoders(stream):
    adapter = make_tiny_adapter("llama")
    tcs = make_tiny_transcoders(adapter, skip=True)
    with torch.no_grad():
        tcs.transcoders[1].b_enc[:5] = -1e6  # features 0-4 of layer 1 never fire
    trained = tcs.transcoders[1].W_dec[:5].clone()
    refit_decoders(adapter, tcs, stream, 16, batch_sequences=8)
    assert torch.allclose(tcs.transcoders[1].W_dec[:5], trained, atol=1e-6)


def test_refit_rejects_no_sequences(stream):
    adapter = make_tiny_adapter("llama")
    with pytest.raises(BadInputError, match="at least one sequence"):
        refit_decoders(adapter, make_tiny_transcoders(adapter), stream, 0)


def test_training_with_a_refit_records_it_and_lowers_the_training_error(stream, tmp_path):
    import yaml
    from test_training import tiny_train_config

    from mechscope.training.trainer import train_transcoders

    heldout = TokenStream(stream.corpus, stream.tokenizer, CTX_LEN, "heldout")
    plain, _ = train_transcoders(make_tiny_adapter("llama"), stream, heldout, tiny_train_config(n_tokens=240),
                                 tmp_path / "plain", tmp_path / "ck", progress=False)
    # the same checkpoint, finished again with a refit (refit_sequences may change on resume)
    refit, _ = train_transcoders(make_tiny_adapter("llama"), stream, heldout, tiny_train_config(n_tokens=240, refit_sequences=16),
                                 tmp_path / "refit", tmp_path / "ck", progress=False)
    config = yaml.safe_load((tmp_path / "refit" / "config.yaml").read_text())
    assert config["training"]["method"].endswith("decoders refit")
    assert len(config["training"]["refit_gain"]) == refit.n_layers and min(config["training"]["refit_gain"]) >= 0
    for a, b in zip(plain.transcoders, refit.transcoders):
        assert torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_dec, b.W_dec)


def test_a_checkpoint_from_before_the_refit_option_resumes_with_a_refit(stream, tmp_path):
    """A checkpoint written before ``refit_sequences`` existed has no such key: it counts as the
    default (0), and asking for a refit on resume is a schedule change, not a different run."""
    import json

    from test_training import tiny_train_config

    from mechscope.training.trainer import train_transcoders

    heldout = TokenStream(stream.corpus, stream.tokenizer, CTX_LEN, "heldout")
    cfg = tiny_train_config(n_tokens=240)
    train_transcoders(make_tiny_adapter("llama"), stream, heldout, cfg, tmp_path / "a", tmp_path / "ck", progress=False)
    state_file = tmp_path / "ck" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["refit_sequences"]
    state_file.write_text(json.dumps(state))
    tiny = tiny_train_config(n_tokens=240, refit_sequences=8)
    train_transcoders(make_tiny_adapter("llama"), stream, heldout, tiny, tmp_path / "b", tmp_path / "ck", progress=False)
    assert (tmp_path / "b" / "config.yaml").exists()
