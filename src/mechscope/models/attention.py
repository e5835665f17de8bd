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

__all__ = ["mechscope_attention", "use_mechscope_attention", "PatternState"]

NAME = "mechscope"
_registered = False


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
    if state is not None and state.frozen is not None:
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
    if pattern.shape[0] == 1 and value.shape[0] > 1:
        # one frozen pattern for the whole batch: fold the batch into the value columns, so
        # autograd keeps the [heads, q, k] pattern once instead of a [batch, heads, q, k] copy
        b, h, k, d = value.shape
        folded = value.permute(1, 2, 0, 3).reshape(h, k, b * d)
        out = torch.matmul(pattern[0], folded).reshape(h, -1, b, d).permute(2, 0, 1, 3)
    else:
        out = torch.matmul(pattern, value)  # (B, nh, q, hs)
    return out.transpose(1, 2).contiguous(), pattern


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
