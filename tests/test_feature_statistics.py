"""Streaming feature statistics equal a brute-force pass over all activations at once."""

from __future__ import annotations

import torch

from mechscope.features.statistics import HIST_EDGES, FeatureStatistics


def _random_acts(n_seq=23, n_pos=40, F=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(n_seq, n_pos, F, generator=gen).exp() * (torch.rand(n_seq, n_pos, F, generator=gen) < 0.2)
    acts[:, :, 11] = 0  # a dead feature
    return acts


def test_streaming_statistics_match_brute_force():
    acts = _random_acts()
    n_seq, n_pos, F = acts.shape
    stats = FeatureStatistics(n_layers=1, d_transcoder=F, top_k=5, window=8, before=3)
    sequences = torch.arange(100, 100 + n_seq)
    for chunk in torch.arange(n_seq).split(4):  # batches of 4 sequences
        stats.update(0, sequences[chunk], acts[chunk])
    body = acts[:, 1:]  # position 0 is BOS
    assert stats.n_tokens == n_seq * (n_pos - 1)
    assert torch.equal(stats.active[0], (body > 0).sum((0, 1)).double())
    assert torch.allclose(stats.max_value[0], body.amax((0, 1)))
    for f in range(F - 1):
        flat = body[:, :, f].argmax()
        s, p = divmod(int(flat), n_pos - 1)
        assert int(stats.max_sequence[0, f]) == 100 + s and int(stats.max_position[0, f]) == p + 1
        # top contexts: the 5 sequences with the largest per-sequence maximum, in order
        per_seq = body[:, :, f].amax(1)
        expected = per_seq.topk(5)
        assert torch.allclose(stats.top_value[0, :, f], expected.values)
        assert stats.top_sequence[0, :, f].tolist() == (100 + expected.indices).tolist()
        for k in range(5):
            seq, start = int(expected.indices[k]), int(stats.top_start[0, k, f])
            window = acts[seq, start : start + 8, f]
            assert torch.allclose(stats.top_acts[0, k, f].float(), window.half().float())
            assert start <= int(acts[seq, 1:, f].argmax()) + 1 < start + 8
        counts = torch.bincount(torch.bucketize(body[:, :, f][body[:, :, f] > 0], HIST_EDGES),
                                minlength=len(HIST_EDGES) + 1)
        assert torch.equal(stats.hist[0, f], counts)
    assert stats.active[0, 11] == 0 and stats.max_value[0, 11] == 0


def test_state_round_trip_resumes_exactly():
    acts = _random_acts(seed=1)
    whole = FeatureStatistics(1, acts.shape[2], top_k=3, window=6)
    whole.update(0, torch.arange(10), acts[:10])
    whole.update(0, torch.arange(10, 23), acts[10:])
    first = FeatureStatistics(1, acts.shape[2], top_k=3, window=6)
    first.update(0, torch.arange(10), acts[:10])
    resumed = FeatureStatistics(1, acts.shape[2], top_k=3, window=6)
    resumed.load_state({k: v.clone() for k, v in first.state().items()})
    resumed.update(0, torch.arange(10, 23), acts[10:])
    for name, value in whole.state().items():
        assert torch.equal(value, resumed.state()[name]), name
