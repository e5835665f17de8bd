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
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

__all__ = ["FeatureStatistics", "HIST_EDGES"]

#: upper edges of the activation histogram bins: 10^-3 .. 10^3, 8 bins per decade (last bin open)
HIST_EDGES = torch.logspace(-3, 3, 49)


class FeatureStatistics:
    """Running statistics of ``n_layers x d_transcoder`` features.

    Args:
        top_k: contexts kept per feature.
        window: tokens per context window (``<= ctx_len - 1``).
        before: tokens shown before the maximum (the window starts ``before`` tokens earlier,
            clipped to the sequence).
    """

    TENSORS = ("active", "max_value", "max_sequence", "max_position", "hist", "top_value", "top_sequence",
               "top_start", "top_acts")

    def __init__(self, n_layers: int, d_transcoder: int, top_k: int = 20, window: int = 32, before: int = 23):
        self.n_layers, self.d_transcoder, self.top_k, self.window, self.before = n_layers, d_transcoder, top_k, window, before
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
        W = min(self.window, n_pos - first_pos)
        start = (seq_pos - self.before).clamp(min=first_pos).clamp(max=n_pos - W)  # [batch, F]
        index = start[:, None, :] + torch.arange(W)[None, :, None]  # [batch, W, F]
        windows = torch.zeros(batch, F, self.window, dtype=torch.float16)
        windows[:, :, :W] = acts.gather(1, index).permute(0, 2, 1).half()
        values = torch.cat([self.top_value[layer], seq_max])  # [K + batch, F]
        keep = values.topk(self.top_k, dim=0).indices  # [K, F]
        self.top_value[layer] = values.gather(0, keep)
        seqs = torch.cat([self.top_sequence[layer], sequences[:, None].expand(batch, F)])
        self.top_sequence[layer] = seqs.gather(0, keep)
        self.top_start[layer] = torch.cat([self.top_start[layer], start]).gather(0, keep)
        all_windows = torch.cat([self.top_acts[layer], windows])
        self.top_acts[layer] = all_windows.gather(0, keep[..., None].expand(-1, -1, self.window))

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (see :meth:`load_state`)."""
        return {name: getattr(self, name) for name in self.TENSORS} | {"n_tokens": torch.tensor(self.n_tokens)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.TENSORS:
            setattr(self, name, tensors[name].clone())
        self.n_tokens = int(tensors["n_tokens"])
