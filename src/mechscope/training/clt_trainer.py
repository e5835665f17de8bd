"""Train a cross-layer transcoder (CLT) by one of two methods (``TrainConfig.method``).

``topk`` (the default): the recipe of the per-layer sets (:mod:`mechscope.training.trainer`) carried
over to the coupled CLT, TopK training, then JumpReLU thresholds calibrated to the TopK firing rates.
``jumprelu``: the objective of Ameisen et al. 2025 ("Circuit Tracing"): JumpReLU features with
learned thresholds and straight-through gradients of the jump (:class:`JumpReLUSTE`), the same
reconstruction loss plus ``lambda sum_i tanh(c a_i ||W_dec,i||)`` with lambda ramped linearly from 0
over training, plus ``lambda_p sum_i ReLU(theta_i - h_i) ||W_dec,i||`` against dead features; decoders
are not renormalised (the penalty weighs their norms); no AuxK, resampling or calibration. Which
one the shipped CLT uses, and why, is measured in the README ("Cross-layer transcoders").

The TopK recipe:

1. The model body runs once per batch; every layer's MLP input and output are read.
2. In normalised units, layer ``l``'s features are TopK(k) of ``W_enc[l] x_l + b_enc[l]``; the
   reconstruction of output layer ``m`` is ``b_dec[m] + sum_{l <= m} decode(a_l, W_dec[l][:, m - l])
   (+ W_skip[m] x_m)``, and the loss is the sum over output layers of each layer's MSE divided by
   its variance. Each feature's decoder, concatenated over its output layers, is kept at unit norm.
   ``W_skip`` starts as the ridge fit of each layer's output on its input.
3. Checkpoints (safetensors + JSON, atomic) every ``checkpoint_every_s``; resume is exact.
4. Per layer, JumpReLU thresholds are calibrated so each feature fires as often as under TopK; the
   set is evaluated (FVU, L0, dead fraction per layer, on held-out text) and saved in circuit-tracer's
   CLT layout.

Memory: the decoders are ``n_layers (n_layers + 1) / 2`` blocks of ``[d_transcoder, d_model]``, with
Adam's two moments each. The AuxK dead-feature loss (``aux_k``, ``aux_coef``, ``dead_after_tokens``) is
carried over per layer (:meth:`CLTTrainee.aux_losses`), and so is the per-layer trainer's resampling
(:meth:`CLTTrainee.resample_dead`, every ``resample_every`` steps during the first ``resample_until``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mechscope import distributed
from mechscope.data.corpus import TokenStream
from mechscope.errors import BadInputError
from mechscope.models.adapter import ModelAdapter
from mechscope.training.metrics import LayerMetrics
from mechscope.training.trainer import (
    TrainConfig,
    _activations,
    _load_checkpoint,
    _lr,
    _save_checkpoint,
    _token_mean,
    calibrated_thresholds,
    changed_on_resume,
    check_world_size,
    evaluate_transcoders,
    gather_rows,
    rank_rows,
    reduce_step,
    resample_due,
)
from mechscope.transcoders.activations import make_activation
from mechscope.transcoders.clt_io import save_clt
from mechscope.transcoders.transcoder import CrossLayerTranscoderSet

__all__ = ["CLTTrainee", "train_clt"]

logger = logging.getLogger(__name__)


class JumpReLUSTE(torch.autograd.Function):
    """JumpReLU ``a = h H(h - theta)`` with straight-through gradients of the jump.

    Forward: ``h`` where ``h > theta``, else 0 (``h [n, F]``, ``theta [F]``, normalised units).
    Backward: the jump's derivative, a Dirac at ``h = theta``, is replaced by the rectangle kernel
    ``K(u) = 1[|u| < 1/2] / epsilon`` with ``u = (h - theta) / epsilon`` (Rajamanoharan et al. 2024,
    "Jumping Ahead", section 4), so ``da/dtheta = -theta K``; this implementation also passes the
    jump's straight-through gradient to the pre-activation, ``da/dh = H(h - theta) + theta K``, so a
    feature just below its threshold learns from the reconstruction error too.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth
        return h * (h > theta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((h - theta).abs() < eps / 2).to(h.dtype) / eps
        jump = grad * theta * kernel
        return grad * (h > theta) + jump, -jump.sum(0), None


class _LowPrecisionProduct(torch.autograd.Function):
    """``a @ W`` computed on operands rounded to ``W_low``'s dtype (bfloat16).

    ``a [n, F]`` float32, ``W [F, m]`` the float32 parameter, ``W_low`` its rounded copy. The
    forward product and both gradients (``g W_low^T`` for ``a``, ``a_low^T g`` for ``W``) run on
    the rounded operands; the CPU's bfloat16 matmul accumulates in float32 and rounds its result to
    bfloat16 (a relative 2^-9), which is returned as float32, like the gradients.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, W: torch.Tensor, W_low: torch.Tensor) -> torch.Tensor:
        a_low = a.to(W_low.dtype)
        ctx.save_for_backward(a_low, W_low)
        return (a_low @ W_low).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a_low, W_low = ctx.saved_tensors
        g = grad.to(W_low.dtype)
        grad_a = (g @ W_low.T).float() if ctx.needs_input_grad[0] else None
        grad_W = (a_low.T @ g).float() if ctx.needs_input_grad[1] else None
        return grad_a, grad_W, None


class _SumIntoOutputLayers(torch.autograd.Function):
    """``decoded [n, n_layers, d_model]`` with ``decoded[:, m] = sum_{l <= m} parts[l][:, m - l]``, for
    ``parts[l] [n, (n_layers - l) d_model]``: each source layer's decoded codes, flattened over the
    output layers it writes to.

    Accumulating into slices of ``decoded`` under autograd (``decoded[:, l:] += part``) copies and
    zero-fills the whole ``[n, n_layers, d_model]`` tensor once per slice in the backward pass
    (measured on the shipped CLT's shape: 60 % of a training step); here the gradient of
    ``parts[l]`` is the strided view ``grad[:, l:]``, no copy.
    """

    @staticmethod
    def forward(ctx, n_layers: int, d_model: int, *parts: torch.Tensor) -> torch.Tensor:
        n = parts[0].shape[0]
        decoded = torch.zeros(n, n_layers, d_model, dtype=parts[0].dtype, device=parts[0].device)
        for l, part in enumerate(parts):
            decoded[:, l:] += part.view(n, n_layers - l, d_model)
        return decoded

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = grad.shape[0]
        return (None, None, *(grad[:, l:].reshape(n, -1) for l in range(grad.shape[1])))


class CLTTrainee(nn.Module):
    """A CLT while training, in normalised units (see the module docstring for the parameters)."""

    def __init__(self, n_layers: int, d_model: int, cfg: TrainConfig, generator: torch.Generator,
                 features: slice | None = None):
        super().__init__()
        self.cfg, self.n_layers = cfg, n_layers
        # features: this rank's slice of every layer's features (feature-sharded training); the full
        # initialisation is drawn and sliced, so the shards together are the one-process trainee
        self.sharded = features is not None
        features = features or slice(None)
        F_ = len(range(cfg.d_transcoder)[features])
        dec = [torch.randn(cfg.d_transcoder, n_layers - l, d_model, generator=generator)[features] for l in range(n_layers)]
        dec = [d / d.flatten(1).norm(dim=1)[:, None, None] for d in dec]  # unit concatenated decoders
        self.W_dec = nn.ParameterList(nn.Parameter(d) for d in dec)
        self.W_enc = nn.ParameterList(nn.Parameter(d[:, 0].clone() / d[:, 0].norm(dim=1, keepdim=True)) for d in dec)
        self.b_enc = nn.ParameterList(nn.Parameter(torch.zeros(F_)) for _ in range(n_layers))
        self.b_dec = nn.ParameterList(nn.Parameter(torch.zeros(d_model)) for _ in range(n_layers))
        self.W_skip = (nn.ParameterList(nn.Parameter(torch.zeros(d_model, d_model)) for _ in range(n_layers))
                       if cfg.skip_connection else None)
        self.jumprelu = cfg.method == "jumprelu"
        if self.jumprelu:  # learned thresholds (log-parametrised, so they stay > 0)
            self.log_threshold = nn.ParameterList(nn.Parameter(torch.full((F_,), math.log(cfg.threshold_init)))
                                                  for _ in range(n_layers))
        self.register_buffer("in_scale", torch.ones(n_layers))
        self.register_buffer("out_scale", torch.ones(n_layers))
        self.register_buffer("last_fired", torch.zeros(n_layers, F_))
        self._low: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (W_dec version, rounded copy)

    @torch.no_grad()
    def initialize(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """Normalisers, ``b_dec`` and ridge-fitted ``W_skip`` from a first batch (``[n, d_model]`` each)."""
        d = xs[0].shape[-1]
        for m, (x, y) in enumerate(zip(xs, ys)):
            self.in_scale[m] = float(x.norm(dim=-1).mean()) / math.sqrt(d)
            self.out_scale[m] = float(y.norm(dim=-1).mean()) / math.sqrt(d)
            x_n, y_n = x / self.in_scale[m], y / self.out_scale[m]
            self.W_enc[m].mul_(self.cfg.encoder_init_scale)
            self.b_dec[m].copy_(y_n.mean(0))
            if self.W_skip is not None and self.cfg.skip_init == "lstsq":
                xc, yc = x_n - x_n.mean(0), y_n - y_n.mean(0)
                gram = xc.T @ xc + 1e-2 * len(xc) * torch.eye(d, device=xc.device)
                self.W_skip[m].copy_(torch.linalg.solve(gram, xc.T @ yc).T)
                self.b_dec[m].copy_(y_n.mean(0) - x_n.mean(0) @ self.W_skip[m].T)

    def pre_activations(self, layer: int, x_n: torch.Tensor) -> torch.Tensor:
        return x_n @ self.W_enc[layer].T + self.b_enc[layer]

    def _top(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, vals)``: the ``k`` largest of ``pre [n, F]`` per token (ReLU'd); for a feature shard,
        its candidates that are among the ``k`` largest of every shard's (the others get value 0)."""
        vals, idx = pre.topk(min(k, pre.shape[-1]), dim=-1)
        if self.sharded:
            vals = torch.where(vals >= _global_kth(vals.detach(), k), vals, torch.zeros_like(vals))
        return idx, vals.clamp(min=0)

    def _all_shards(self, decoded: torch.Tensor) -> torch.Tensor:
        """A feature shard's decoded share plus every other shard's, as a constant (gradients stay local)."""
        if not self.sharded:
            return decoded
        local = decoded.detach()
        total = local.clone()
        distributed.all_reduce_sum_([total])
        return decoded + (total - local)

    def forward_topk(self, xs_n: list[torch.Tensor]):
        """``(codes per layer, reconstructions [n, n_layers, d_model] of every output layer,
        pre-activations [n, F] per layer)``; codes are ``(idx [n, k], vals [n, k])`` under TopK and
        the activations ``[n, F]`` under the ``jumprelu`` method.

        Each source layer's codes are decoded once into all its output layers (one sparse product
        with its concatenated decoder ``[F, (n_layers - l) d_model]``) and added into the output
        layers' slots by one autograd function (:class:`_SumIntoOutputLayers`): 18 decodes for
        Gemma 3 270M instead of 171 per-pair ones, no zero-filled gradient of a whole decoder per
        pair, and no copy of the whole reconstruction per source layer in the backward pass."""
        n, d = xs_n[0].shape
        pres = [self.pre_activations(m, x) for m, x in enumerate(xs_n)]
        if self.jumprelu:  # dense codes [n, F] (many fire early in training)
            codes = [JumpReLUSTE.apply(pre, t.exp(), self.cfg.bandwidth) for pre, t in zip(pres, self.log_threshold)]
            parts = [self._decode(l, a) for l, a in enumerate(codes)]
        else:
            codes = [self._top(pre, self.cfg.k) for pre in pres]
            parts = [F.embedding_bag(idx, self.W_dec[l].flatten(1), per_sample_weights=vals, mode="sum")
                     for l, (idx, vals) in enumerate(codes)]
        decoded = _SumIntoOutputLayers.apply(self.n_layers, d, *parts)
        recon = self._all_shards(decoded) + torch.stack(list(self.b_dec))
        if self.W_skip is not None:
            recon = recon + torch.stack([x @ w.T for x, w in zip(xs_n, self.W_skip)], dim=1)
        return codes, recon, pres

    def _decode(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        """``a [n, F] @ W_dec[layer]`` flattened to ``[n, (n_layers - layer) d_model]``, in
        ``cfg.decoder_dtype``; the rounded decoder is made once per optimizer step (it is reused
        until the parameter's version changes)."""
        W = self.W_dec[layer].flatten(1)
        if self.cfg.decoder_dtype == "float32":
            return a @ W
        version = self.W_dec[layer]._version
        cached = self._low.get(layer)
        if cached is None or cached[0] != version:
            cached = (version, W.detach().to(getattr(torch, self.cfg.decoder_dtype)))
            self._low[layer] = cached
        return _LowPrecisionProduct.apply(a, W, cached[1])

    def aux_losses(self, pres: list[torch.Tensor], recon: torch.Tensor, ys_n: list[torch.Tensor], mean
                   ) -> list[torch.Tensor]:
        """The AuxK dead-feature loss (Gao et al. 2024, section A.2) carried over to a CLT: per layer, the
        ``aux_k`` most active of its dead features (no firing in ``dead_after_tokens`` tokens) predict,
        through their decoder to that layer, what the reconstruction of that layer misses; the squared
        error is normalised by the residual's. Layers without dead features add nothing."""
        terms = []
        for m, (pre, y) in enumerate(zip(pres, ys_n)):
            r = recon[:, m]
            dead = self.last_fired[m] >= self.cfg.dead_after_tokens
            n_dead = dead.sum().float()
            if self.sharded:
                distributed.all_reduce_sum_([n_dead])
            if int(n_dead) == 0:
                continue
            residual = (y - r).detach()
            idx, vals = self._top(pre.masked_fill(~dead, float("-inf")), min(self.cfg.aux_k, int(n_dead)))
            aux_hat = self._all_shards(F.embedding_bag(idx, self.W_dec[m][:, 0], per_sample_weights=vals, mode="sum"))
            aux = mean((aux_hat - residual).pow(2).sum(-1)) / mean(residual.pow(2).sum(-1)).detach().clamp(min=1e-8)
            terms.append(torch.nan_to_num(aux, nan=0.0))
        return terms

    def loss(self, xs: list[torch.Tensor], ys: list[torch.Tensor], sparsity_ramp: float = 1.0):
        """``(loss, per-layer normalised MSE, per-layer fired masks)`` for raw ``[n, d_model]`` inputs.

        The reconstruction loss is the sum over output layers of each layer's MSE divided by its
        variance. TopK adds the AuxK term; ``jumprelu`` adds ``sparsity_ramp * sparsity_coef`` times
        the tanh sparsity penalty and ``preact_coef`` times the pre-activation penalty (per token,
        summed over layers and features; ``||W_dec,i||`` is feature i's decoder norm concatenated over
        its output layers)."""
        xs_n = [x / self.in_scale[m] for m, x in enumerate(xs)]
        ys_n = [y / self.out_scale[m] for m, y in enumerate(ys)]
        codes, recon, pres = self.forward_topk(xs_n)
        # over this step's tokens on every rank (one process, or feature shards that all see the same
        # tokens: a plain mean)
        mean = (lambda v: v.mean(0)) if self.sharded else _token_mean
        y_all = torch.stack(ys_n, dim=1)  # [n, n_layers, d_model]
        variances = mean((y_all - mean(y_all)).pow(2).sum(-1)).detach()  # [n_layers]
        mses = mean((recon - y_all).pow(2).sum(-1)) / variances
        loss = mses.sum()
        if self.jumprelu:
            fired = [(a > 0).any(0) for a in codes]
            penalty, preact = 0.0, 0.0
            for l, (a, pre) in enumerate(zip(codes, pres)):
                norms = self.W_dec[l].flatten(1).norm(dim=1)  # [F]
                penalty = penalty + mean(torch.tanh(self.cfg.sparsity_c * a * norms).sum(-1))
                preact = preact + mean((F.relu(self.log_threshold[l].exp() - pre) * norms).sum(-1))
            loss = loss + sparsity_ramp * self.cfg.sparsity_coef * penalty + self.cfg.preact_coef * preact
            return loss, list(mses.detach()), fired
        fired = []
        for idx, vals in codes:
            mask = torch.zeros(self.W_enc[0].shape[0], dtype=torch.bool, device=vals.device)
            mask[idx[vals > 0]] = True
            fired.append(mask)
        if self.cfg.aux_coef > 0:
            aux = self.aux_losses(pres, recon, ys_n, mean)
            if aux:
                loss = loss + self.cfg.aux_coef * sum(aux)
        return loss, list(mses.detach()), fired

    @torch.no_grad()
    def resample_dead(self, xs: list[torch.Tensor], ys: list[torch.Tensor], opt: torch.optim.Optimizer,
                      generator: torch.Generator) -> list[int]:
        """Re-initialise each layer's dead features on the tokens the CLT explains worst.

        The per-layer trainer's resampling (Anthropic, "Towards Monosemanticity", 2023) carried over
        to a CLT: a dead feature of layer ``l`` (no firing in ``dead_after_tokens`` tokens) writes to
        layers ``l .. n_layers - 1``, so its token is drawn with probability proportional to the
        squared error summed over those output layers (each in normalised units), its concatenated
        decoder becomes that token's residual over them at unit norm, its encoder row the token's
        centred input direction at layer ``l`` scaled to 0.2 of the mean alive encoder norm, its
        bias 0, and its Adam moments are reset. ``xs``, ``ys``: raw ``[n, d_model]`` per layer.
        Returns the number of features resampled per layer (over every feature shard). Feature
        shards draw the tokens of all shards' dead features in feature order and each takes its own,
        so sharded training resamples as one process does; every shard calls this at the same step."""
        xs_n = [x / self.in_scale[m] for m, x in enumerate(xs)]
        ys_n = torch.stack([y / self.out_scale[m] for m, y in enumerate(ys)], dim=1)
        residual = ys_n - self.forward_topk(xs_n)[1]  # [n, n_layers, d_model]
        tail_error = residual.pow(2).sum(-1).flip(1).cumsum(1).flip(1)  # [n, l]: error over layers >= l
        counts = []
        for l in range(self.n_layers):
            dead = self.last_fired[l] >= self.cfg.dead_after_tokens
            alive_sum = torch.stack([self.W_enc[l][~dead].norm(dim=-1).sum(), (~dead).sum().to(residual.dtype)])
            offset, n_dead = 0, int(dead.sum())
            if self.sharded:  # draw for every shard's dead features, in feature order, and take this shard's
                per_rank = [int(c) for c in distributed.all_gather_tensors(dead.sum().reshape(1))]
                offset, n_dead = sum(per_rank[:distributed.rank()]), sum(per_rank)
                distributed.all_reduce_sum_([alive_sum])
            counts.append(n_dead)
            if n_dead == 0:
                continue
            weights = tail_error[:, l]
            tokens = torch.multinomial((weights / weights.sum()).cpu(), n_dead, replacement=True,
                                       generator=generator).to(residual.device)
            tokens = tokens[offset:offset + int(dead.sum())]
            if len(tokens) == 0:
                continue
            directions = residual[tokens, l:].flatten(1)
            directions = directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            inputs = xs_n[l][tokens] - xs_n[l].mean(0)
            inputs = inputs / inputs.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            alive_norm = alive_sum[0] / alive_sum[1] if alive_sum[1] > 0 else torch.tensor(1.0)
            self.W_dec[l][dead] = directions.view(len(tokens), self.n_layers - l, -1)
            self.W_enc[l][dead] = inputs * alive_norm * 0.2
            self.b_enc[l][dead] = 0.0
            for param in (self.W_dec[l], self.W_enc[l], self.b_enc[l]):
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in opt.state.get(param, {}):
                        opt.state[param][key][dead] = 0.0
            self.last_fired[l, dead] = 0
        return counts

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every feature shard holds whole (``b_dec``, ``W_skip``)."""
        return list(self.b_dec) + (list(self.W_skip) if self.W_skip is not None else [])

    @torch.no_grad()
    def after_step(self, fired: list[torch.Tensor], n_tokens: int) -> None:
        self.last_fired += n_tokens
        for m, mask in enumerate(fired):
            self.last_fired[m, mask] = 0
        if not self.jumprelu:  # TopK keeps unit decoders; the jumprelu penalty weighs decoder norms instead
            for d in self.W_dec:
                d /= d.flatten(1).norm(dim=1).clamp(min=1e-8)[:, None, None]

    @torch.no_grad()
    def to_set(self, thresholds: list[torch.Tensor], model_name: str, scan: str) -> CrossLayerTranscoderSet:
        """Fold the normalisation into a JumpReLU :class:`CrossLayerTranscoderSet` in raw units."""
        d_model = self.W_enc[0].shape[1]
        clt = CrossLayerTranscoderSet(self.n_layers, d_model, self.cfg.d_transcoder, "jumprelu",
                                      skip_connection=self.W_skip is not None, model_name=model_name, scan=scan)
        for l in range(self.n_layers):
            clt.W_enc[l].copy_(self.W_enc[l] / self.in_scale[l])
            clt.b_enc[l].copy_(self.b_enc[l])
            clt.b_dec[l].copy_(self.b_dec[l] * self.out_scale[l])
            clt.W_dec[l].copy_(self.W_dec[l] * self.out_scale[l:][None, :, None])  # column j -> output layer l + j
            if self.W_skip is not None:
                clt.W_skip[l].copy_(self.W_skip[l] * (self.out_scale[l] / self.in_scale[l]))
            clt.activation_functions[l] = make_activation("jumprelu", self.cfg.d_transcoder, threshold=thresholds[l])
        return clt.requires_grad_(False)


def _global_kth(vals: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, 1]``: the k-th largest of every rank's ``[n, k_local]`` TopK candidates, per token."""
    candidates = torch.cat(distributed.all_gather_tensors(vals.contiguous()), dim=-1)
    return candidates.topk(k, dim=-1).values[:, -1:]


def train_clt(adapter: ModelAdapter, train_stream: TokenStream, heldout_stream: TokenStream, cfg: TrainConfig,
              out: Path, checkpoint_dir: Path, progress: bool = True,
              eval_adapter=None, shard_features: bool = False) -> tuple[CrossLayerTranscoderSet, list[LayerMetrics]]:
    """Train, checkpoint, resume, calibrate, evaluate and save a CLT (see the module docstring).

    Under torch.distributed the ranks split each batch (data-parallel), or, with ``shard_features``,
    every layer's features: rank ``r`` holds features ``[r F / N, (r + 1) F / N)`` of every layer with
    their Adam moments, every rank reads the whole batch, TopK is taken over all ranks' candidates
    and the reconstructions are all-reduced, so a CLT larger than one device trains; each rank
    checkpoints its own slice and rank 0 gathers the whole set at the end.

    ``eval_adapter``: a callable returning the model used for calibration and the held-out figures
    (the float32 model when training read a bfloat16 one); default ``adapter``.

    Returns:
        the set and its held-out metrics; ``(None, [])`` on ranks other than 0.

    Raises:
        BadInputError: a checkpoint from a different config or world size is in ``checkpoint_dir``;
            ``d_transcoder`` not divisible by the world size when sharding features.
    """
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    world, rank = distributed.world_size(), distributed.rank()
    shard_features = shard_features and world > 1
    if shard_features:
        if cfg.d_transcoder % world:
            raise BadInputError(f"--d-transcoder {cfg.d_transcoder} must be a multiple of the world size ({world}) "
                                "to shard every layer's features evenly")
        size = cfg.d_transcoder // world
        rows = list(range(cfg.batch_sequences))
        trainee = CLTTrainee(adapter.n_layers, adapter.d_model, cfg, generator, slice(rank * size, (rank + 1) * size))
        ckpt = checkpoint_dir / f"checkpoint-shard{rank}-of-{world}"
    else:
        rows = rank_rows(cfg.batch_sequences, cfg.minibatches)
        trainee = CLTTrainee(adapter.n_layers, adapter.d_model, cfg, generator)
        ckpt = checkpoint_dir / "checkpoint"
    trainee.to(adapter.device)
    data_world = 1 if shard_features else world  # how many ranks split each batch
    opt = torch.optim.Adam(trainee.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    state = {"config": asdict(cfg), "step": 0, "index": 0, "tokens": 0, "history": [], "world_size": world,
             "shard_features": shard_features}
    if (ckpt / "state.json").exists():
        saved = json.loads((ckpt / "state.json").read_text())
        check_world_size(ckpt, saved)
        if saved.get("shard_features", False) != shard_features:
            raise BadInputError(f"{ckpt} was written {'with' if saved.get('shard_features') else 'without'} "
                                "--shard-features; resume it the same way")
        changed_on_resume(ckpt, saved["config"], cfg)
        state = _load_checkpoint(ckpt, trainee, opt)
        state["config"] = asdict(cfg)
    stream = train_stream.batches(cfg.batch_sequences, start=state["index"])
    bar = tqdm(total=cfg.n_steps, initial=state["step"], disable=not progress or not distributed.is_main(),
               desc="training CLT", unit="step")
    last_save = time.monotonic()
    while state["step"] < cfg.n_steps:
        index, batch = next(stream)
        xs, ys = _activations(adapter, batch[rows])  # this rank's share of the batch (feature shards: all of it)
        if state["step"] == 0:  # from the whole batch, in one process's order, on every rank
            if data_world > 1:
                xs_all, ys_all = [gather_rows(x, cfg.minibatches) for x in xs], [gather_rows(y, cfg.minibatches) for y in ys]
            else:
                xs_all, ys_all = xs, ys
            trainee.initialize(xs_all, ys_all)
        for part in torch.arange(xs[0].shape[0]).chunk(cfg.minibatches):
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, state["step"])
            opt.zero_grad(set_to_none=True)
            loss, mse_values, fired = trainee.loss([x[part] for x in xs], [y[part] for y in ys],
                                                   sparsity_ramp=min(1.0, (state["step"] + 1) / cfg.n_steps))
            loss.backward()
            if shard_features:  # replicas of b_dec and W_skip take the same (averaged) step everywhere
                grads = [p.grad for p in trainee.replicated_parameters() if p.grad is not None]
                distributed.all_reduce_sum_(grads)
                for g in grads:
                    g /= world
            elif world > 1:  # the step of the whole batch
                mse_values, fired = reduce_step(trainee.parameters(), mse_values, fired)
            mses = [float(m) for m in mse_values]
            opt.step()
            trainee.after_step(fired, len(part) * data_world)
            state["step"] += 1
        if cfg.method == "topk" and resample_due(cfg, state["step"]):
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["step"])
            if data_world > 1:  # the whole batch on every rank, so every rank draws the same tokens
                xs, ys = [gather_rows(x, cfg.minibatches) for x in xs], [gather_rows(y, cfg.minibatches) for y in ys]
            resampled = trainee.resample_dead(xs, ys, opt, generator)
            logger.info("step %d: resampled %s dead features", state["step"], resampled)
        state.update(index=index, tokens=state["tokens"] + xs[0].shape[0] * data_world)
        bar.update(cfg.minibatches)
        if state["step"] % 100 < cfg.minibatches:
            dead = (trainee.last_fired >= cfg.dead_after_tokens).float().mean(1)
            state["history"].append({"step": state["step"], "tokens": state["tokens"], "mse": [round(m, 4) for m in mses],
                                     "dead": [round(float(d), 4) for d in dead]})
        if time.monotonic() - last_save > cfg.checkpoint_every_s or state["step"] >= cfg.n_steps:
            _save_checkpoint(ckpt, trainee, opt, state, every_rank=shard_features)
            last_save = time.monotonic()
            dead = (trainee.last_fired >= cfg.dead_after_tokens).float().mean(1)
            logger.info("checkpoint at step %d of %d, %d tokens; this step's normalised MSE mean %.3f, max %.3f; "
                        "dead max %.3f", state["step"], cfg.n_steps, state["tokens"], sum(mses) / len(mses), max(mses),
                        float(dead.max()))
    bar.close()
    if shard_features:  # rank 0 gathers every slice into the whole trainee (on the CPU)
        trainee = _gathered(trainee, adapter, cfg)
    if not distributed.is_main():  # rank 0 calibrates, evaluates and saves
        distributed.barrier()
        return None, []
    calib = TokenStream(train_stream.corpus, train_stream.tokenizer, cfg.ctx_len, "train", seed=cfg.seed + 1,
                        sources=train_stream.sources)
    evaluator = adapter if eval_adapter is None else eval_adapter()
    if cfg.method == "jumprelu":  # learned thresholds (pre-activations are the same in raw units)
        thresholds = [t.detach().exp().cpu() for t in trainee.log_threshold]
    else:
        thresholds = _calibrate_clt(evaluator, trainee, calib, cfg)
    result = trainee.to_set(thresholds, adapter.name, out.name)
    metrics = evaluate_transcoders(evaluator, result, heldout_stream, cfg.eval_sequences, cfg.batch_sequences)
    method = ("CLT: JumpReLU (straight-through), tanh sparsity, pre-activation penalty" if cfg.method == "jumprelu"
              else "CLT: TopK, JumpReLU calibrated")
    extra = {"training": {**asdict(cfg), "tokens_trained": state["tokens"], "method": method,
                          "corpus": [{"source": e["source"], "weight": e["weight"]} for e in train_stream.manifest["sources"]]},
             "heldout_metrics": [m.as_dict() for m in metrics]}
    save_clt(result, out, dtype=torch.bfloat16, extra_config=extra)
    distributed.barrier()
    return result, metrics


@torch.no_grad()
def _gathered(shard: CLTTrainee, adapter: ModelAdapter, cfg: TrainConfig) -> CLTTrainee | None:
    """The whole trainee from every rank's feature slice, on rank 0's CPU (``None`` elsewhere)."""
    full = CLTTrainee(adapter.n_layers, adapter.d_model, cfg, torch.Generator().manual_seed(cfg.seed))
    replicated = {id(p) for p in shard.replicated_parameters()} | {id(shard.in_scale), id(shard.out_scale)}
    for (name, part), (_, target) in zip(shard.state_dict(keep_vars=True).items(), full.state_dict(keep_vars=True).items()):
        if id(part) in replicated:
            target.data.copy_(part.detach().cpu())
            continue
        dim = 1 if name == "last_fired" else 0  # [n_layers, F] ; parameters have features first
        target.data.copy_(torch.cat([p.cpu() for p in distributed.all_gather_tensors(part.detach())], dim=dim))
    return full if distributed.is_main() else None


@torch.no_grad()
def _calibrate_clt(adapter, trainee: CLTTrainee, calib: TokenStream, cfg: TrainConfig) -> list[torch.Tensor]:
    """Per layer, JumpReLU thresholds (in raw units: pre-activations do not depend on the output
    scale) matching each feature's TopK firing rate on calibration text."""
    pre_chunks = [[] for _ in range(trainee.n_layers)]
    counts = [torch.zeros(cfg.d_transcoder) for _ in range(trainee.n_layers)]
    for i, (_, batch) in enumerate(calib.batches(cfg.batch_sequences)):
        if i * cfg.batch_sequences >= cfg.calibration_sequences:
            break
        xs, _ = _activations(adapter, batch)
        for layer, x in enumerate(xs):
            x = x.to(trainee.in_scale.device)
            pre = trainee.pre_activations(layer, x / trainee.in_scale[layer])
            vals, idx = pre.topk(cfg.k, dim=-1)
            counts[layer] += torch.bincount(idx[vals > 0], minlength=cfg.d_transcoder).float().cpu()
            pre_chunks[layer].append(pre.half().cpu())
    alive = (trainee.last_fired < cfg.dead_after_tokens).cpu()
    return [calibrated_thresholds(torch.cat(pre_chunks[l]).float(), counts[l], alive[l]) for l in range(trainee.n_layers)]
