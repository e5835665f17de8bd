"""Gemma 3 (text): sandwich norms, GeGLU MLP, sliding-window attention on 5 of 6 layers.

Transcoders read ``pre_feedforward_layernorm``'s output and write ``post_feedforward_layernorm``'s
output, the sites Gemma Scope 2 uses. RMSNorm multiplies by ``(1 + weight)`` in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from mechscope.models.adapter import ModelAdapter, scale_frozen

__all__ = ["Gemma3Adapter"]


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)

    def layer_norms(self, layer: int) -> list[nn.Module]:
        block = self.layers[layer]
        return [block.input_layernorm, block.post_attention_layernorm, block.pre_feedforward_layernorm]

    def mlp_output_modules(self, layer: int) -> list[str]:
        return ["mlp", "post_feedforward_layernorm"]

    def normalize(self, module: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scale_frozen(x.float(), scale.float(), 1.0 + module.weight.float()).type_as(x)
