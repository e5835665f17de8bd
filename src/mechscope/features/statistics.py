"""Streaming per-feature statistics for feature dashboards (one pass, mergeable, checkpointable).

For every feature of every layer, over all non-BOS tokens seen:

- ``active``: tokens where the activation is > 0 (density = active / n_tokens);
- ``max_value`` and where it occurred (``max_sequence``, ``max_position``);
- ``hist``: counts of positive activations in log-spaced bins (:data:`HIST_EDGES`);
- the ``top_k`` *contexts*: the sequences with the highest per-sequence maximum (at most one entry
  per sequence, so contexts are distinct), each with a window of ``window`` per-token activations
  around its maximum (``top_start`` is the window's first position).

This is what Neuronpedia's dashboards show as density, max activation, activation histogram and
top activations; tokens are looked up from the sequence index when the store is written.

:class:`QuantileExamples` is the second pass: once each feature's maximum is known, it samples
tokens uniformly at random within equal-width activation intervals ``(q/Q, (q+1)/Q] x max``
(Neuronpedia's ``examples_quantiles``, "Subsample Interval q"), so a dashboard shows what weak and
middling activations look like, not only the top.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

__all__ = ["FeatureStatistics", "QuantileExamples", "HIST_EDGES"]

#: upper edges of the activation histogram bins: 10^-3 .. 10^3, 8 bins per decade (last bin open)
HIST_EDGES = torch.logspace(-3, 3, 49)


class FeatureStatistics:
    """Running statistics of ``n_layers x d_transcoder`` features.

    Args:
        top_k: contexts kept per feature.
        window: tokens per context window (``<= ctx_len - 1``).
        before: tokens shown before the maximum (the window starts ``before`` tokens earlier,
            clipped to the sequence; at most ``window - 1``).
    """

    TENSORS = ("active", "max_value", "max_sequence", "max_position", "hist", "top_value", "top_sequence",
               "top_start", "top_acts")

    def __init__(self, n_layers: int, d_transcoder: int, top_k: int = 20, window: int = 32, before: int = 23):
        self.n_layers, self.d_transcoder, self.top_k, self.window = n_layers, d_transcoder, top_k, window
        self.before = min(before, window - 1)  # the maximum stays inside the window
        L, F, K, W = n_layers, d_transcoder, top_k, window
        self.n_tokens = 0
        self.active = torch.zeros(L, F, dtype=torch.float64)
        self.max_value = torch.zeros(L, F)
        self.max_sequence = torch.full((L, F), -1, dtype=torch.long)
        self.max_position = torch.full((L, F), -1, dtype=torch.long)
        self.hist = torch.zeros(L, F, len(HIST_EDGES) + 1, dtype=torch.long)
        self.top_value = torch.zeros(L, K, F)
        self.top_sequence = torch.full((L, K, F), -1, dtype=torch.long)
        self.top_start = torch.zeros(L, K, F, dtype=torch.long)
        self.top_acts = torch.zeros(L, K, F, W, dtype=torch.float16)

    @torch.no_grad()
    def update(self, layer: int, sequences: Int[torch.Tensor, "batch"], acts: Float[torch.Tensor, "batch pos d_transcoder"],
               first_pos: int = 1) -> None:
        """Add one batch of one layer's activations.

        Args:
            sequences: ``[batch]`` global sequence indices (the token stream's).
            acts: ``[batch, pos, d_transcoder]``; positions before ``first_pos`` (BOS) are ignored.
        """
        acts = acts.float().clone()
        acts[:, :first_pos] = 0
        batch, n_pos, F = acts.shape
        if layer == 0:
            self.n_tokens += batch * (n_pos - first_pos)
        positive = acts > 0
        self.active[layer] += positive.sum((0, 1)).double()
        # histogram: bincount over (feature, bin) of every positive activation
        values = acts[positive]
        features = positive.nonzero()[:, 2]
        bins = torch.bucketize(values, HIST_EDGES)
        self.hist[layer] += torch.bincount(features * (len(HIST_EDGES) + 1) + bins,
                                           minlength=F * (len(HIST_EDGES) + 1)).view(F, -1)
        # per-sequence maxima and their windows
        seq_max, seq_pos = acts.max(dim=1)  # [batch, F]
        best = seq_max.max(0)
        better = best.values > self.max_value[layer]
        self.max_value[layer] = torch.where(better, best.values, self.max_value[layer])
        self.max_sequence[layer] = torch.where(better, sequences[best.indices], self.max_sequence[layer])
        self.max_position[layer] = torch.where(better, seq_pos[best.indices, torch.arange(F)], self.max_position[layer])
        start, windows = _windows(acts, torch.arange(batch)[:, None].expand(batch, F), seq_pos,
                                  torch.arange(F).expand(batch, F), self.window, self.before, first_pos)
        values = torch.cat([self.top_value[layer], seq_max])  # [K + batch, F]
        seqs = torch.cat([self.top_sequence[layer], sequences[:, None].expand(batch, F)])
        keep = _best(values, seqs, self.top_k, dim=0)  # [K, F]
        self.top_value[layer] = values.gather(0, keep)
        self.top_sequence[layer] = seqs.gather(0, keep)
        self.top_start[layer] = torch.cat([self.top_start[layer], start]).gather(0, keep)
        all_windows = torch.cat([self.top_acts[layer], windows])
        self.top_acts[layer] = all_windows.gather(0, keep[..., None].expand(-1, -1, self.window))

    @classmethod
    def merged(cls, parts: list[FeatureStatistics]) -> FeatureStatistics:
        """The statistics of the union of the parts' (disjoint) sequences: what one pass over all of
        them gives. Counts and histograms add; a maximum tied between parts goes to the earliest
        sequence, the one a single pass meets first; the top contexts are the best ``top_k`` of all
        parts' (equal values ordered by sequence, as in one pass: :func:`_best`).

        Raises:
            ValueError: parts of different shapes or settings.
        """
        first = parts[0]
        if any((p.n_layers, p.d_transcoder, p.top_k, p.window, p.before) !=
               (first.n_layers, first.d_transcoder, first.top_k, first.window, first.before) for p in parts):
            raise ValueError("feature statistics of different shapes or settings cannot be merged")
        out = cls(first.n_layers, first.d_transcoder, first.top_k, first.window, first.before)
        out.n_tokens = sum(p.n_tokens for p in parts)
        out.active = sum(p.active for p in parts)
        out.hist = sum(p.hist for p in parts)
        values = torch.stack([p.max_value for p in parts])  # [P, L, F]
        sequences = torch.stack([p.max_sequence for p in parts])
        order = torch.where(sequences < 0, torch.iinfo(torch.long).max, sequences)
        is_best = values == values.max(0, keepdim=True).values
        pick = torch.where(is_best, order, torch.iinfo(torch.long).max).argmin(0, keepdim=True)  # [1, L, F]
        out.max_value = values.gather(0, pick)[0]
        out.max_sequence = sequences.gather(0, pick)[0]
        out.max_position = torch.stack([p.max_position for p in parts]).gather(0, pick)[0]
        top = torch.cat([p.top_value for p in parts], dim=1)  # [L, P*K, F]
        top_sequence = torch.cat([p.top_sequence for p in parts], dim=1)
        keep = _best(top, top_sequence, first.top_k, dim=1)
        out.top_value = top.gather(1, keep)
        out.top_sequence = top_sequence.gather(1, keep)
        out.top_start = torch.cat([p.top_start for p in parts], dim=1).gather(1, keep)
        out.top_acts = torch.cat([p.top_acts for p in parts], dim=1).gather(
            1, keep[..., None].expand(-1, -1, -1, first.window))
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (see :meth:`load_state`)."""
        return {name: getattr(self, name) for name in self.TENSORS} | {"n_tokens": torch.tensor(self.n_tokens)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.TENSORS:
            setattr(self, name, tensors[name].clone())
        self.n_tokens = int(tensors["n_tokens"])


def _best(values: torch.Tensor, sequences: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Indices along ``dim`` of the ``k`` largest ``values``, equal values by ascending sequence
    (two stable sorts: a lexicographic order), so the top contexts do not depend on how the corpus
    was split into batches or ranks."""
    by_sequence = sequences.argsort(dim=dim, stable=True)
    by_value = values.gather(dim, by_sequence).argsort(dim=dim, descending=True, stable=True)
    return by_sequence.gather(dim, by_value).narrow(dim, 0, k)


def _windows(acts: torch.Tensor, batch: torch.Tensor, position: torch.Tensor, feature: torch.Tensor, window: int,
             before: int, first_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``window`` activations around ``acts[batch, position, feature]`` (index tensors of
    one shape ``S``), starting ``before`` tokens earlier, clipped to positions ``first_pos..``.

    Returns:
        ``(start [S], windows [S, window] float16)``, zero-padded when the sequence is shorter.
    """
    n_pos = acts.shape[1]
    width = min(window, n_pos - first_pos)
    start = (position - before).clamp(min=first_pos).clamp(max=n_pos - width)
    index = start[..., None] + torch.arange(width)
    windows = torch.zeros(*start.shape, window, dtype=torch.float16)
    n_features = acts.shape[2]
    flat = (batch[..., None] * n_pos + index) * n_features + feature[..., None]
    windows[..., :width] = acts.reshape(-1).take(flat).half()
    return start, windows


class QuantileExamples:
    """Examples sampled uniformly within activation intervals of each feature's maximum.

    A token with activation ``a > 0`` of a feature with maximum ``m`` falls in interval
    ``min(floor(Q * a / m), Q - 1)``. Every such token gets a uniform random key; each interval keeps
    the ``per_interval`` tokens with the smallest keys, which is a uniform sample without replacement
    of that interval's tokens (bottom-k sampling: mergeable across batches, so exact under resume).

    Args:
        max_value: ``[n_layers, d_transcoder]`` each feature's maximum (from :class:`FeatureStatistics`).
        n_intervals: ``Q``.
        per_interval: examples kept per interval.
        window, before: as in :class:`FeatureStatistics`.
        seed: keys are drawn from a generator seeded by ``(seed, layer, first sequence of the batch)``.
    """

    TENSORS = ("key", "value", "sequence", "position", "start", "acts")

    def __init__(self, max_value: torch.Tensor, n_intervals: int = 10, per_interval: int = 5, window: int = 32,
                 before: int = 23, seed: int = 0):
        self.max_value = max_value.float()
        self.n_intervals, self.per_interval, self.window, self.before, self.seed = (
            n_intervals, per_interval, window, min(before, window - 1), seed)
        L, F = max_value.shape
        shape = (L, n_intervals, per_interval, F)
        self.key = torch.full(shape, float("inf"))
        self.value = torch.zeros(shape)
        self.sequence = torch.full(shape, -1, dtype=torch.long)
        self.position = torch.zeros(shape, dtype=torch.long)
        self.start = torch.zeros(shape, dtype=torch.long)
        self.acts = torch.zeros(*shape, window, dtype=torch.float16)

    @torch.no_grad()
    def update(self, layer: int, sequences: Int[torch.Tensor, "batch"], acts: Float[torch.Tensor, "batch pos d_transcoder"],
               first_pos: int = 1) -> None:
        """Add one batch of one layer's activations (same arguments as :meth:`FeatureStatistics.update`)."""
        acts = acts.float().clone()
        acts[:, :first_pos] = 0
        batch, n_pos, F = acts.shape
        Q, K = self.n_intervals, self.per_interval
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(sequences[0]) * 101 + layer)
        keys = torch.rand(batch * n_pos, F, generator=gen)
        maximum = self.max_value[layer].clamp(min=torch.finfo(torch.float32).tiny)
        interval = (acts.reshape(-1, F) * (Q / maximum)).floor().clamp(max=Q - 1)
        composite = torch.where(acts.reshape(-1, F) > 0, interval + keys, torch.inf)  # [tokens, F]
        ordered, order = composite.sort(dim=0)
        # first row of each interval in the sorted order, then its K smallest keys
        bounds = torch.arange(Q, dtype=torch.float32)[:, None].expand(Q, F).contiguous()
        first = torch.searchsorted(ordered.T.contiguous(), bounds.T.contiguous()).T  # [Q, F]
        rows = (first[:, None, :] + torch.arange(K)[None, :, None]).clamp(max=len(ordered) - 1)  # [Q, K, F]
        features = torch.arange(F).expand(Q, K, F)
        candidate = ordered[rows, features]
        inside = candidate < torch.arange(1, Q + 1)[:, None, None]
        new_key = torch.where(inside, candidate - candidate.floor(), torch.inf)
        token = order[rows, features]
        seq_index, position = token // n_pos, token % n_pos
        start, windows = _windows(acts, seq_index, position, features, self.window, self.before, first_pos)
        merged = torch.cat([self.key[layer], new_key], dim=1)  # [Q, 2K, F]
        keep = merged.topk(K, dim=1, largest=False).indices
        self.key[layer] = merged.gather(1, keep)

        def merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            both = torch.cat([old, new], dim=1)
            index = keep.view(*keep.shape, *([1] * (both.dim() - 3))).expand(*keep.shape, *both.shape[3:])
            return both.gather(1, index)

        self.value[layer] = merge(self.value[layer], acts[seq_index, position, features])
        self.sequence[layer] = merge(self.sequence[layer], sequences[seq_index])
        self.position[layer] = merge(self.position[layer], position)
        self.start[layer] = merge(self.start[layer], start)
        self.acts[layer] = merge(self.acts[layer], windows)

    @classmethod
    def merged(cls, parts: list[QuantileExamples]) -> QuantileExamples:
        """The examples of the union of the parts' (disjoint) batches: each interval keeps the
        ``per_interval`` smallest keys of all parts' — exactly one pass's sample, since the keys are
        drawn per batch, whichever process draws them (bottom-k samples merge exactly).

        Raises:
            ValueError: parts of different shapes, settings or maxima.
        """
        first = parts[0]
        if any(p.key.shape != first.key.shape or not torch.equal(p.max_value, first.max_value) for p in parts):
            raise ValueError("quantile examples of different shapes or feature maxima cannot be merged")
        out = cls(first.max_value, first.n_intervals, first.per_interval, first.window, first.before, first.seed)
        keys = torch.cat([p.key for p in parts], dim=2)  # [L, Q, P*K, F]
        keep = keys.topk(first.per_interval, dim=2, largest=False).indices
        for name in cls.TENSORS:
            both = torch.cat([getattr(p, name) for p in parts], dim=2)
            index = keep.view(*keep.shape, *([1] * (both.dim() - 4))).expand(*keep.shape, *both.shape[4:])
            setattr(out, name, both.gather(2, index))
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSORS}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.TENSORS:
            setattr(self, name, tensors[name].clone())
