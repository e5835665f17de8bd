"""Decoder geometry: direct logit effects through the final norm, decoder cosines, antipodal pairs,
for per-layer sets and cross-layer transcoders (whose features write to every later layer)."""

from __future__ import annotations

import pytest
import torch
from conftest import SET_KINDS, make_tiny_clt, make_tiny_set, random_set

from mechscope.errors import BadInputError
from mechscope.features.dense import antipodal_pairs, decoder_cosines, logit_effects


@pytest.mark.parametrize("set_kind", SET_KINDS)
@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_logit_effects_apply_the_final_norm_gain(tiny_adapter, family, set_kind):
    model = tiny_adapter(family)
    tcs = make_tiny_set(model, set_kind)
    features = torch.tensor([0, 5, 7])
    effects = logit_effects(model, tcs, 1, features)
    if set_kind == "per-layer":
        d = tcs[1].W_dec[features].float()
    else:  # a layer-1 CLT feature writes to every output layer 1..n_layers-1: its writes add up in the residual
        d = tcs.W_dec[1][features].float().sum(1)
    norm = model.final_norm()
    if family == "gemma3":  # RMSNorm with (1 + w)
        expected = (d * (1 + norm.weight.float())) @ model.W_U.float().T
    else:  # LayerNorm: centre, then gain; the bias is not part of a direction
        expected = ((d - d.mean(-1, keepdim=True)) * norm.weight.float()) @ model.W_U.float().T
    assert effects.shape == (3, model.vocab_size)
    assert torch.allclose(effects, expected, atol=1e-5)
    with pytest.raises(BadInputError, match="feature indices must be in 0..47"):
        logit_effects(model, tcs, 1, torch.tensor([48]))


def test_cosines_and_antipodal_pairs_on_constructed_decoders():
    tcs = random_set(n_layers=2, d_model=16, d_transcoder=8, seed=3)
    with torch.no_grad():
        tcs[0].W_dec[1] = -2.0 * tcs[0].W_dec[0]  # exact opposite direction, other norm
        tcs[0].W_dec[2] = tcs[0].W_dec[0] + 0.01 * tcs[0].W_dec[3]  # nearly the same
    ids = [(0, 0), (0, 1), (0, 2), (1, 0)]
    cos = decoder_cosines(tcs, ids)
    assert cos[0, 1] == pytest.approx(-1.0, abs=1e-6)
    assert cos[0, 2] > 0.99
    assert cos[0, 3] == 0.0  # a per-layer feature of another layer writes elsewhere
    assert torch.allclose(cos.diagonal(), torch.ones(4))
    never = torch.zeros(4, 4, dtype=torch.long)
    assert antipodal_pairs(cos, never) == [(0, 1, pytest.approx(-1.0, abs=1e-6)), (1, 2, pytest.approx(float(cos[1, 2])))]
    coactive = never.clone()
    coactive[0, 1] = coactive[1, 0] = 3  # fire together: not an antipodal pair
    assert [(a, b) for a, b, _ in antipodal_pairs(cos, coactive)] == [(1, 2)]
    with pytest.raises(BadInputError, match="threshold"):
        antipodal_pairs(cos, never, threshold=0.5)
    with pytest.raises(BadInputError, match="layer 5"):
        decoder_cosines(tcs, [(5, 0)])


def test_cosines_of_a_clt_concatenate_its_output_layers(tiny_adapter):
    """A CLT feature's decoder vector is its writes to every output layer laid end to end, zero
    before its own layer: features of different layers share the layers both write to."""
    clt = make_tiny_clt(tiny_adapter("gemma3"))  # 3 layers
    features = [(0, 1), (1, 2), (2, 3), (0, 4)]
    by_hand = torch.zeros(4, 3, clt.d_model)  # [feature, output layer, d_model]
    for i, (layer, feature) in enumerate(features):
        by_hand[i, layer:] = clt.W_dec[layer][feature]
    by_hand = by_hand.flatten(1) / by_hand.flatten(1).norm(dim=1, keepdim=True)
    cos = decoder_cosines(clt, features)
    torch.testing.assert_close(cos, by_hand @ by_hand.T)
    assert cos[0, 2] != 0 and cos[1, 2] != 0  # a per-layer set's would be 0
