"""Llama family (SmolLM2, Llama 2/3, Mistral-like): pre-norm blocks, RMSNorm ``weight * x_hat``.

Transcoders read ``post_attention_layernorm``'s output (the MLP input) and write the MLP output.
"""

from __future__ import annotations

import torch
from torch import nn

from mechscope.models.adapter import ModelAdapter, scale_frozen

__all__ = ["LlamaAdapter"]


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral")

    def layer_norms(self, layer: int) -> list[nn.Module]:
        block = self.layers[layer]
        return [block.input_layernorm, block.post_attention_layernorm]

    def normalize(self, module: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and module.weight.dtype == torch.float32:
            return scale_frozen(x, scale.float(), module.weight)
        return module.weight * (x.float() * scale).to(x.dtype)  # rounded to the model's dtype first, as Llama does
