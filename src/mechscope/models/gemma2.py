"""Gemma 2: like Gemma 3 (sandwich norms, ``(1 + weight)`` RMSNorm) plus attention and final-logit
soft-capping, which :mod:`mechscope.models.attention` and ``ModelAdapter.output_logits`` apply."""

from __future__ import annotations

from mechscope.models.gemma3 import Gemma3Adapter

__all__ = ["Gemma2Adapter"]


class Gemma2Adapter(Gemma3Adapter):
    family = "gemma2"
    model_types = ("gemma2",)
