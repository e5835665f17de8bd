"""GPT-2: LayerNorm (mean subtraction, bias), learned positions added before block 0, ``h.{i}.mlp``.

The embedding node is the residual stream entering block 0 (token plus position embedding).
"""

from __future__ import annotations

import torch
from torch import nn

from mechscope.models.adapter import ModelAdapter

__all__ = ["GPT2Adapter"]


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)

    @property
    def layers(self) -> nn.ModuleList:
        return self.body.h

    def final_norm(self) -> nn.Module:
        return self.body.ln_f

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.layers]

    def layer_norms(self, layer: int) -> list[nn.Module]:
        return [self.layers[layer].ln_1, self.layers[layer].ln_2]

    def norm_scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(x.float().var(-1, unbiased=False, keepdim=True) + module.eps)

    def normalize(self, module: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        centered = x.float() - x.float().mean(-1, keepdim=True)
        return (centered * scale * module.weight + module.bias).to(x.dtype)
