"""Streaming feature statistics equal a brute-force pass over all activations at once."""

from __future__ import annotations

import torch

from mechscope.features.statistics import HIST_EDGES, FeatureStatistics, QuantileExamples


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


def _quantile_pass(acts, seed=0, split=4, Q=4, K=3):
    body_max = acts[:, 1:].amax((0, 1))[None]
    sampler = QuantileExamples(body_max, n_intervals=Q, per_interval=K, window=8, before=3, seed=seed)
    for chunk in torch.arange(acts.shape[0]).split(split):
        sampler.update(0, 100 + chunk, acts[chunk])
    return sampler


def test_quantile_examples_are_distinct_tokens_of_their_interval():
    acts = _random_acts(seed=2)
    n_seq, n_pos, F = acts.shape
    Q, K = 4, 3
    sampler = _quantile_pass(acts, Q=Q, K=K)
    maximum = acts[:, 1:].amax((0, 1))
    for f in range(F):
        for q in range(Q):
            a = acts[:, 1:, f]
            in_interval = (a > 0) & ((a / maximum[f] * Q).floor().clamp(max=Q - 1) == q) if maximum[f] > 0 else a > 0
            n_expected = min(K, int(in_interval.sum())) if maximum[f] > 0 else 0
            kept = torch.isfinite(sampler.key[0, q, :, f])
            assert int(kept.sum()) == n_expected, (f, q)
            tokens = set()
            for k in kept.nonzero()[:, 0].tolist():
                seq = int(sampler.sequence[0, q, k, f]) - 100
                pos, start = int(sampler.position[0, q, k, f]), int(sampler.start[0, q, k, f])
                assert in_interval[seq, pos - 1]
                assert float(sampler.value[0, q, k, f]) == float(acts[seq, pos, f])
                assert start <= pos < start + 8
                assert torch.equal(sampler.acts[0, q, k, f], acts[seq, start:start + 8, f].half())
                tokens.add((seq, pos))
            assert len(tokens) == n_expected  # without replacement


def test_quantile_sampling_is_uniform_and_resumes_exactly():
    acts = _random_acts(n_seq=8, n_pos=10, seed=3)
    # resume: state after the first batches + the rest == one run
    whole = _quantile_pass(acts, seed=5)
    first = QuantileExamples(acts[:, 1:].amax((0, 1))[None], n_intervals=4, per_interval=3, window=8, before=3, seed=5)
    for chunk in torch.arange(8).split(4)[:1]:
        first.update(0, 100 + chunk, acts[chunk])
    resumed = QuantileExamples(acts[:, 1:].amax((0, 1))[None], n_intervals=4, per_interval=3, window=8, before=3, seed=5)
    resumed.load_state(first.state())
    resumed.update(0, 100 + torch.arange(4, 8), acts[4:])
    for name, value in whole.state().items():
        assert torch.equal(value, resumed.state()[name]), name
    # uniform: over seeds, every token of the fullest interval is picked about K / n of the time
    a, maximum = acts[:, 1:, 0], acts[:, 1:, 0].max()
    bins = (a / maximum * 4).floor().clamp(max=3).masked_fill(a <= 0, -1)
    q = int(torch.bincount(bins[bins >= 0].long()).argmax())
    n = int((bins == q).sum())
    assert n > 3
    counts: dict[tuple[int, int], int] = {}
    runs = 600
    for seed in range(runs):
        sampler = _quantile_pass(acts, seed=seed)
        for k in range(3):
            key = (int(sampler.sequence[0, q, k, 0]), int(sampler.position[0, q, k, 0]))
            counts[key] = counts.get(key, 0) + 1
    assert len(counts) == n
    expected = runs * 3 / n
    assert all(abs(c - expected) < 5 * (expected * (1 - 3 / n)) ** 0.5 for c in counts.values()), (counts, expected)
