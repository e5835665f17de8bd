"""Qwen2 and Qwen3: Llama-shaped blocks (Qwen2 adds q/k/v biases, Qwen3 q/k norms; neither changes
the MLP sites or the residual-stream norms)."""

from __future__ import annotations

from mechscope.models.llama import LlamaAdapter

__all__ = ["QwenAdapter"]


class QwenAdapter(LlamaAdapter):
    family = "qwen"
    model_types = ("qwen2", "qwen3")
