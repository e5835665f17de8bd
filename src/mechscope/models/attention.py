"""An attention function that records attention patterns or replays frozen ones.

Registered with ``transformers``' ``AttentionInterface`` under the name ``"mechscope"`` the first time
an adapter needs it (never at import time). While :func:`use_mechscope_attention` is active every
attention module of the model calls :func:`mechscope_attention`, which

- computes softmax attention exactly as the eager implementation does (scaling, soft-capping,
  additive causal / sliding-window mask, grouped-query heads) and optionally records the pattern, or
- replays a recorded pattern (detached), making the layer linear in its values: the "frozen
  attention" of the local replacement model (Ameisen et al. 2025, "Circuit Tracing").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["mechscope_attention", "use_mechscope_attention", "PatternState", "band_width", "band_block", "banded_matmul",
           "MIN_BANDED_QUERIES"]

NAME = "mechscope"
_registered = False

# Frozen patterns of at least this many queries are multiplied banded (banded_matmul). Below it the
# blocks' extra products cost more than the zeros they skip: one layer-9 group of 64 targets on
# Gemma 3 270M (2 Zen 4 cores), banded / dense seconds: 29 tokens 0.29-0.36 / 0.27-0.33, 112 tokens
# 1.21-1.25 / 1.15-1.20, 200 tokens 2.44 / 2.43-2.62, 300 tokens 4.4-5.1 / 5.5-5.8, 516 tokens 8.6 / 10.6.
MIN_BANDED_QUERIES = 256


@dataclass
class PatternState:
    """Per-module attention mode: record into ``record`` or replay ``frozen`` (``[1, heads, q, k]``)."""

    layer: int
    record: dict[int, torch.Tensor] | None = None
    frozen: dict[int, torch.Tensor] | None = None


def mechscope_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs
):
    """Eager attention with pattern recording / replay.

    Args:
        query: ``[batch, heads, q, head_dim]``; key, value: ``[batch, kv_heads, k, head_dim]``.
        attention_mask: additive ``[batch, 1, q, k]`` mask or ``None`` (then causal).

    Returns:
        ``(output [batch, q, heads, head_dim], pattern [batch, heads, q, k])``.
    """
    state: PatternState | None = getattr(module, "_mechscope_state", None)
    groups = query.shape[1] // value.shape[1]
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    frozen = state is not None and state.frozen is not None
    if frozen:
        pattern = state.frozen[state.layer].to(value.dtype).detach()
    else:
        key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        else:
            q, k = scores.shape[-2:]
            causal = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
            scores = scores.masked_fill(~causal, float("-inf"))
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if state is not None and state.record is not None:
            state.record[state.layer] = pattern[:1].detach()
    window = band_width(pattern) if frozen and pattern.shape[-2] >= MIN_BANDED_QUERIES else None
    if pattern.shape[0] == 1 and (value.shape[0] > 1 or window is not None):
        # one frozen pattern for the whole batch: fold the batch into the value columns, so
        # autograd keeps the [heads, q, k] pattern once instead of a [batch, heads, q, k] copy
        b, h, k, d = value.shape
        folded = value.permute(1, 2, 0, 3).reshape(h, k, b * d)
        out = banded_matmul(pattern[0], folded, window) if window is not None else torch.matmul(pattern[0], folded)
        out = out.reshape(h, -1, b, d).permute(2, 0, 1, 3)
    else:
        out = torch.matmul(pattern, value)  # (B, nh, q, hs)
    return out.transpose(1, 2).contiguous(), pattern


def band_width(pattern: torch.Tensor) -> int | None:
    """The band of a frozen ``[1, heads, q, q]`` pattern: one more than the largest distance
    ``t - s`` of a non-zero entry (query ``t``, key ``s``), read from the pattern itself, so it holds
    for whatever mask made it — ``q`` (or less) for causal attention, the window for a
    sliding-window layer (entries further back are exact zeros: softmax of -inf).

    Returns ``None`` (multiply densely) for a rectangular pattern, one with an entry above the
    diagonal (a key after its query, as bidirectional image-token attention has), or one too short
    to split into two blocks (:func:`band_block`).
    """
    q, k = pattern.shape[-2:]
    if q != k:
        return None
    rows = pattern[0].ne(0).any(0)  # [q, k]: any head attends
    if bool(rows.triu(1).any()):
        return None
    first = torch.where(rows.any(-1), rows.int().argmax(-1), torch.arange(q, device=rows.device))
    window = int((torch.arange(q, device=rows.device) - first).max()) + 1
    return window if q > band_block(q, window) else None


def band_block(q: int, window: int) -> int:
    """Queries per block of :func:`banded_matmul`: half the window, at most an eighth of the prompt
    (so a causal pattern costs about ``0.56 q^2`` multiply-adds per column instead of ``q^2``), at
    least 16 (smaller products lose more to overhead than the zeros they skip)."""
    return max(16, min((window + 1) // 2, -(-q // 8)))


def banded_matmul(pattern: torch.Tensor, values: torch.Tensor, window: int, block: int | None = None) -> torch.Tensor:
    """``pattern @ values`` for a pattern that is zero outside a band of ``window`` keys up to and
    including each query: entry ``[h, t, s]`` is zero unless ``t - window < s <= t`` (causal
    attention: ``window = q``; a sliding-window layer: its window).

    Queries go in blocks of ``block`` (default :func:`band_block`), each multiplied with the keys it
    can see; the backward pass (the gradient at the values, ``pattern^T @ grad``) goes in blocks of
    keys, each with the queries that see it. Both cost about ``q (block + window)`` multiply-adds per
    column where ``window << q`` and ``q (q + block) / 2`` for causal attention, instead of ``q^2``;
    they read slices of their operands without copying them and write disjoint blocks; autograd
    keeps only the pattern (which the caller holds anyway), and the function works under
    ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap). Equal to the dense product up to
    float summation order (only exact zeros are skipped).

    Args:
        pattern: ``[heads, q, q]``, no gradient (a frozen pattern).
        values: ``[heads, q, n]``.
        window: the band's width (:func:`band_width`).

    Returns:
        ``[heads, q, n]``.
    """
    q = pattern.shape[-1]
    return _BandedProduct.apply(pattern.detach(), values, window, block or band_block(q, window))


def _lower_band_product(pattern: torch.Tensor, values: torch.Tensor, window: int, block: int) -> torch.Tensor:
    """``pattern @ values`` by blocks of queries (``pattern`` zero outside ``t - window < s <= t``)."""
    q = pattern.shape[-1]
    blocks = []
    for start in range(0, q, block):
        stop, first_key = min(start + block, q), max(0, start - window + 1)
        blocks.append(torch.bmm(pattern[:, start:stop, first_key:stop], _rows(values, first_key, stop)))
    return torch.cat(blocks, dim=-2)


def _upper_band_product(pattern: torch.Tensor, grad: torch.Tensor, window: int, block: int) -> torch.Tensor:
    """``pattern^T @ grad`` by blocks of keys (``pattern`` zero outside ``t - window < s <= t``)."""
    q = pattern.shape[-1]
    blocks = []
    for start in range(0, q, block):
        stop = min(start + block, q)
        last_query = min(q, stop + window - 1)
        # torch.matmul, not bmm: under is_grads_batched (legacy vmap) matmul has no batching rule and
        # runs one [heads, b, keys] x [heads, keys, n] product per sample, which measured faster than
        # bmm's rule (it copies the unbatched pattern per sample) and than per-head mm on transposes:
        # 516 causal / 2,047 window 512 at batch 64, one layer: 0.37 / 2.76 s vs 0.39 / 4.04 and 0.57 / 2.97
        blocks.append(torch.matmul(pattern[:, start:last_query, start:stop].transpose(1, 2), _rows(grad, start, last_query)))
    return torch.cat(blocks, dim=-2)


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``x[..., start:stop, :]``; ``x`` itself for all of its rows (a whole-tensor slice is an
    ``alias``, which the batched gradients of ``is_grads_batched`` cannot take)."""
    return x if start == 0 and stop == x.shape[-2] else x[..., start:stop, :]


class _BandedProduct(torch.autograd.Function):
    """:func:`banded_matmul` with its banded backward pass; gradient for ``values`` only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pattern, values, window, block):
        return _lower_band_product(pattern, values, window, block)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pattern, _, window, block = inputs
        ctx.save_for_backward(pattern)
        ctx.window, ctx.block = window, block

    @staticmethod
    def backward(ctx, grad):
        (pattern,) = ctx.saved_tensors
        return None, _upper_band_product(pattern, grad, ctx.window, ctx.block), None, None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, mechscope_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    _registered = True


@contextlib.contextmanager
def use_mechscope_attention(
    adapter,
    record: dict[int, torch.Tensor] | None = None,
    frozen: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Route the adapter's attention through :func:`mechscope_attention` for the duration.

    Args:
        record: dict filled with ``layer -> pattern [1, heads, q, k]`` of the first batch row.
        frozen: dict of patterns to replay instead of computing them.
    """
    _register()
    config = adapter.hf.config
    previous = config._attn_implementation
    modules = adapter.attention_modules()
    config._attn_implementation = NAME
    handles = []
    for layer, module in enumerate(modules):
        module._mechscope_state = PatternState(layer, record=record, frozen=frozen)
        if frozen is not None:
            # a replayed pattern ignores queries and keys: detach them so autograd neither tracks
            # nor keeps their projections, norms and rotary products ([batch, pos, heads * head_dim]
            # per layer; GPT-2's fused c_attn has no separate q/k projection and stays as is)
            for name in ("q_proj", "k_proj"):
                if isinstance(getattr(module, name, None), torch.nn.Module):
                    handles.append(getattr(module, name).register_forward_hook(lambda m, args, out: out.detach()))
    try:
        yield
    finally:
        config._attn_implementation = previous
        for module in modules:
            module._mechscope_state = None
        for handle in handles:
            handle.remove()
