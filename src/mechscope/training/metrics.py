"""Transcoder quality metrics: FVU (normalised MSE), L0 and dead fraction.

FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over tokens (the fraction of the MLP output's
variance the transcoder leaves unexplained; 0 is perfect, 1 is no better than the mean). L0 = mean
number of active features per token. Dead fraction = share of features that never fire on the
evaluated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float

__all__ = ["LayerMetrics", "MetricsAccumulator"]


@dataclass
class LayerMetrics:
    """Metrics of one layer's transcoder on a token set."""

    layer: int
    fvu: float
    l0: float
    dead_fraction: float
    n_tokens: int

    def as_dict(self) -> dict:
        return {"layer": self.layer, "fvu": self.fvu, "l0": self.l0,
                "dead_fraction": self.dead_fraction, "n_tokens": self.n_tokens}


@dataclass
class MetricsAccumulator:
    """Accumulates one layer's error, variance, L0 and firing counts over batches.

    Variance is taken around the running mean with the exact two-pass-free formula
    ``sum ||y||^2 - n ||mean||^2``.
    """

    layer: int
    d_transcoder: int
    sq_err: float = 0.0
    sum_y: torch.Tensor | None = None
    sum_sq_y: float = 0.0
    active: float = 0.0
    n: int = 0
    fired: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def update(
        self,
        y: Float[torch.Tensor, "n d_model"],
        y_hat: Float[torch.Tensor, "n d_model"],
        acts: Float[torch.Tensor, "n d_transcoder"],
    ) -> None:
        y, y_hat = y.double(), y_hat.double()
        self.sq_err += float((y - y_hat).pow(2).sum())
        self.sum_y = y.sum(0) if self.sum_y is None else self.sum_y + y.sum(0)
        self.sum_sq_y += float(y.pow(2).sum())
        fires = acts > 0
        self.active += float(fires.sum())
        counts = fires.sum(0)
        self.fired = counts if self.fired is None else self.fired + counts
        self.n += y.shape[0]

    def result(self) -> LayerMetrics:
        mean = self.sum_y / self.n
        variance = self.sum_sq_y - self.n * float(mean.pow(2).sum())
        return LayerMetrics(
            layer=self.layer,
            fvu=self.sq_err / max(variance, 1e-12),
            l0=self.active / self.n,
            dead_fraction=float((self.fired == 0).float().mean()),
            n_tokens=self.n,
        )
