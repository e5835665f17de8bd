"""Activation functions of transcoder features: ReLU, JumpReLU and TopK.

JumpReLU (Rajamanoharan et al. 2024; Gemma Scope): ``a = x * (x > threshold)`` per feature.
TopK (Gao et al. 2024): keep the ``k`` largest pre-activations per token, zero the rest.
Each is a module so a transcoder's ``state_dict`` holds ``activation_function.threshold`` the way
circuit-tracer's files do.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn

from mechscope.errors import BadInputError

__all__ = ["ReLU", "JumpReLU", "TopK", "make_activation", "ACTIVATIONS"]


class ReLU(nn.Module):
    """``max(x, 0)``."""

    name = "relu"

    def forward(self, x: Float[torch.Tensor, "... d_transcoder"]) -> torch.Tensor:
        return torch.relu(x)


class JumpReLU(nn.Module):
    """``x * (x > threshold)``, with a per-feature ``threshold`` of shape ``[d_transcoder]``."""

    name = "jumprelu"

    def __init__(self, threshold: Float[torch.Tensor, "d_transcoder"]):
        super().__init__()
        self.threshold = nn.Parameter(threshold, requires_grad=False)

    def forward(self, x: Float[torch.Tensor, "... d_transcoder"]) -> torch.Tensor:
        return x * (x > self.threshold)


class TopK(nn.Module):
    """Keep the ``k`` largest pre-activations of each token (and only positive ones)."""

    name = "topk"

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise BadInputError(f"TopK needs k >= 1, got {k}")
        self.k = int(k)

    def forward(self, x: Float[torch.Tensor, "... d_transcoder"]) -> torch.Tensor:
        values, indices = x.topk(min(self.k, x.shape[-1]), dim=-1)
        return torch.zeros_like(x).scatter_(-1, indices, values.clamp(min=0))


ACTIVATIONS = ("relu", "jumprelu", "topk")


def make_activation(
    name: str, d_transcoder: int, k: int | None = None, threshold: torch.Tensor | None = None
) -> nn.Module:
    """Build an activation module by name (one of :data:`ACTIVATIONS`).

    Raises:
        BadInputError: for an unknown name or a TopK without ``k``.
    """
    if name == "relu":
        return ReLU()
    if name == "jumprelu":
        return JumpReLU(threshold if threshold is not None else torch.zeros(d_transcoder))
    if name == "topk":
        if k is None:
            raise BadInputError("a TopK transcoder needs k (config key 'k')")
        return TopK(k)
    raise BadInputError(f"unknown activation function {name!r}; choose one of {', '.join(ACTIVATIONS)}")
