"""Least-squares refit of per-layer transcoder decoders with the encoders fixed.

TopK training fits the decoder to TopK codes; the shipped set encodes with calibrated JumpReLU
thresholds, whose codes differ (a feature near its threshold fires under one rule and not the
other). With the encoder fixed the best decoder for the codes the set actually produces is a linear
least-squares problem: per layer, find ``W_dec``, ``b_dec`` and ``W_skip`` minimising

    sum_t || y_t - a_t W_dec - x_t W_skip^T - b_dec ||^2  +  lam * || theta - theta_0 ||^2

over ``n`` tokens of text, where ``a_t = JumpReLU(W_enc x_t + b_enc)`` (fixed) and ``theta_0`` are
the trained weights (so a feature that never fires on the fitting text keeps its trained decoder).
This is decoder-only fine-tuning with the encoder frozen, solved exactly instead of by gradient
steps; nothing about which features fire changes. Sufficient statistics (``Z^T Z`` and ``Z^T y`` of ``Z = [a, x, 1]``) are accumulated in
float64 batch by batch, so memory is ``(d_transcoder + d_model + 1)^2`` per layer whatever ``n`` is.
"""

from __future__ import annotations

import torch

from mechscope.data.corpus import TokenStream
from mechscope.errors import BadInputError
from mechscope.models.adapter import ModelAdapter
from mechscope.transcoders.transcoder import PerLayerTranscoderSet

__all__ = ["refit_decoders"]


@torch.no_grad()
def refit_decoders(
    adapter: ModelAdapter,
    transcoders: PerLayerTranscoderSet,
    stream: TokenStream,
    n_sequences: int,
    batch_sequences: int = 16,
    ridge: float = 1e-3,
) -> list[float]:
    """Refit every layer's ``W_dec``, ``b_dec`` (and ``W_skip``) in place by ridge-regularised least squares.

    Args:
        adapter: the model whose MLP inputs/outputs (``[tokens, d_model]``, BOS dropped) are fitted.
        transcoders: a per-layer set (changed in place; encoders and thresholds untouched).
        stream: text to fit on (its first ``n_sequences`` sequences); use training text, not held-out.
        ridge: ``lam`` relative to the mean diagonal of ``Z^T Z`` (pull towards the trained weights).

    Returns:
        per layer, the fraction of the squared error on the fitting text that the refit removed.

    Raises:
        BadInputError: ``n_sequences < 1``, or a set that is not per-layer.
    """
    from mechscope.training.trainer import _activations

    if n_sequences < 1:
        raise BadInputError(f"refit needs at least one sequence, got {n_sequences}")
    if not isinstance(transcoders, PerLayerTranscoderSet):
        raise BadInputError("decoder refit is implemented for per-layer transcoder sets")
    device = next(transcoders.parameters()).device
    dims = []
    for tc in transcoders.transcoders:
        dims.append(tc.d_transcoder + (tc.d_model if tc.W_skip is not None else 0) + 1)
    gram = [torch.zeros(n, n, dtype=torch.float64, device=device) for n in dims]
    cross = [torch.zeros(n, tc.d_model, dtype=torch.float64, device=device)
             for n, tc in zip(dims, transcoders.transcoders)]
    sse_before = [0.0] * len(dims)
    seen = 0
    for _, batch in stream.batches(batch_sequences):
        if seen >= n_sequences:
            break
        batch = batch[: n_sequences - seen]
        seen += len(batch)
        xs, ys = _activations(adapter, batch)
        for layer, tc in enumerate(transcoders.transcoders):
            x, y = xs[layer].to(device), ys[layer].to(device)
            z = _design(tc, x)
            gram[layer] += z.T @ z
            cross[layer] += z.T @ y.double()
            sse_before[layer] += float((y - tc.decode(tc.encode(x), x)).pow(2).sum())
    gains = []
    for layer, tc in enumerate(transcoders.transcoders):
        theta0 = _parameters(tc)
        g, c = gram[layer], cross[layer]
        lam = ridge * float(g.diagonal().mean())
        theta = torch.linalg.solve(g + lam * torch.eye(len(g), dtype=g.dtype, device=device), c + lam * theta0)
        # squared error of theta on the fitting text from the statistics: sum y^2 - 2 <theta, c> + <theta, G theta>,
        # compared with theta0's (the y^2 term cancels)
        delta = float(-2 * (theta * c).sum() + (theta * (g @ theta)).sum()
                      + 2 * (theta0 * c).sum() - (theta0 * (g @ theta0)).sum())
        gains.append(-delta / sse_before[layer] if sse_before[layer] > 0 else 0.0)
        _assign(tc, theta)
    return gains


def _design(tc, x: torch.Tensor) -> torch.Tensor:
    """``Z = [a, x, 1]`` (``x`` only with a skip connection), float64 ``[n, dims]``."""
    parts = [tc.encode(x)]
    if tc.W_skip is not None:
        parts.append(x)
    parts.append(torch.ones(len(x), 1, device=x.device))
    return torch.cat(parts, dim=1).double()


def _parameters(tc) -> torch.Tensor:
    """The decoder side as one ``[dims, d_model]`` matrix matching :func:`_design`'s columns."""
    parts = [tc.W_dec]
    if tc.W_skip is not None:
        parts.append(tc.W_skip.T)
    parts.append(tc.b_dec[None])
    return torch.cat(parts).double()


def _assign(tc, theta: torch.Tensor) -> None:
    f = tc.d_transcoder
    tc.W_dec.copy_(theta[:f])
    if tc.W_skip is not None:
        tc.W_skip.copy_(theta[f: f + tc.d_model].T)
    tc.b_dec.copy_(theta[-1])
