"""Train a per-layer transcoder for every layer in one pass over streamed activations.

Method (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; Ameisen et al. 2025 note that
TopK training followed by JumpReLU threshold calibration is a valid shortcut):

1. Stream ``[batch, ctx_len]`` sequences from the corpus, run the model body once per batch and
   read every layer's MLP input and output (BOS position dropped).
2. Per layer, work in normalised units (inputs and outputs divided by their RMS norm, measured on
   the first batch), encode with TopK(k), decode, add the skip connection, and minimise
   ``||y - y_hat||^2 / Var(y)`` plus AuxK: the residual is also fitted by the top ``aux_k``
   *dead* features (not fired in ``dead_after_tokens`` tokens), weight ``aux_coef``.
   Decoder rows are kept at unit norm.
3. Checkpoint (safetensors + JSON, atomic directory swap) every ``checkpoint_every_s`` seconds;
   the token stream is a function of the sequence index, so resume is exact.
4. At the end, calibrate a JumpReLU threshold per feature so each feature fires as often as it did
   under TopK, fold the normalisation into the weights, evaluate FVU / L0 / dead fraction on
   held-out text and save the set in circuit-tracer's layout.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from jaxtyping import Bool, Float
from torch import nn
from tqdm.auto import tqdm

from mechscope import distributed
from mechscope.data.corpus import TokenStream
from mechscope.errors import BadInputError
from mechscope.models.adapter import ModelAdapter
from mechscope.paths import atomic_directory
from mechscope.training.metrics import LayerMetrics, MetricsAccumulator
from mechscope.transcoders.io import save_transcoder_set
from mechscope.transcoders.transcoder import PerLayerTranscoder, PerLayerTranscoderSet, TranscoderSet

__all__ = ["TrainConfig", "train_transcoders", "evaluate_transcoders", "TopKTrainee"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (every field is saved with the checkpoint).

    Attributes:
        d_transcoder: features per layer.
        k: active features per token during TopK training (>= 1).
        skip_connection: learn a linear skip ``W_skip``.
        n_tokens: training tokens (BOS positions excluded).
        batch_sequences: sequences per step; tokens per step = batch_sequences * (ctx_len - 1).
        ctx_len: tokens per sequence including BOS.
        lr: peak Adam learning rate; linear warm-up over ``warmup_steps``, linear decay over the
            last ``decay_fraction`` of training.
        aux_k, aux_coef, dead_after_tokens: AuxK dead-feature loss (Gao et al. 2024, section A.2).
        eval_sequences: held-out sequences for the evaluation.
        checkpoint_every_s: seconds between checkpoints.
        seed: initialisation and data order.
        minibatches: optimizer steps per activation batch (each on a slice of it), so a short
            run still takes enough steps.
        encoder_init_scale: initial encoder row norm (decoder rows start at unit norm).
        skip_init: ``lstsq`` (ridge fit on the first batch) or ``zero``.
        resample_every: every this many optimizer steps, re-initialise features that have not
            fired in ``dead_after_tokens`` tokens (0 = never) ...
        resample_until: ... during the first this fraction of the steps, so the last ones settle.
        calibration_sequences: sequences whose pre-activations set the JumpReLU thresholds.
        refit_sequences: after calibration, refit each layer's decoder, decoder bias and skip by
            least squares on this many training sequences with the calibrated encoder fixed
            (:func:`mechscope.training.refit.refit_decoders`; 0 = no refit).
        model_dtype: dtype of the model forward that produces the training activations
            (``float32`` or ``bfloat16``; transcoders always train in float32). On this CPU a
            bfloat16 forward of Qwen2.5 0.5B is 3.4x faster, and its MLP outputs differ from float32
            by an FVU of 0.001-0.03; calibration and held-out figures use the float32 model when one
            is given (see :func:`train_transcoders`).
        method: ``topk`` (TopK + AuxK + resampling, then JumpReLU thresholds calibrated to the TopK
            firing rates) or ``jumprelu`` (cross-layer transcoders only: the objective of Ameisen
            et al. 2025, "Circuit Tracing", section "Building an interpretable replacement model",
            see :mod:`mechscope.training.clt_trainer`; thresholds are learned, not calibrated).
        sparsity_coef: ``jumprelu``: final weight lambda of the sparsity penalty
            ``sum_i tanh(c a_i ||W_dec,i||)`` (per token, summed over layers), ramped linearly from 0
            over training.
        sparsity_c: ``jumprelu``: the scale ``c`` inside the tanh.
        preact_coef: ``jumprelu``: weight of the pre-activation penalty ``sum_i ReLU(theta_i - h_i)
            ||W_dec,i||`` that pulls features below threshold back up (against dead features).
        bandwidth: ``jumprelu``: width epsilon of the rectangle kernel of the straight-through
            gradient of the jump (normalised pre-activation units).
        threshold_init: ``jumprelu``: initial threshold of every feature (normalised units).
        decoder_dtype: ``jumprelu``: precision of the products with the cross-layer decoders (the
            bulk of a step: ``[n, F] x [F, (n_layers - l) d_model]`` per source layer, forward and
            both gradients). ``bfloat16`` rounds their operands and results (relative 2^-9;
            the products accumulate in float32) and is 2.4x faster on a CPU with AVX512-BF16
            (measured; emulated, and slower, on CPUs without it); parameters, optimizer state and
            everything else stay float32.
    """

    d_transcoder: int = 1792
    k: int = 56
    skip_connection: bool = True
    n_tokens: int = 3_200_000
    batch_sequences: int = 16
    ctx_len: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    decay_fraction: float = 0.2
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_after_tokens: int = 200_000
    eval_sequences: int = 1024
    checkpoint_every_s: float = 300.0
    seed: int = 0
    minibatches: int = 4
    resample_every: int = 500
    resample_until: float = 0.7
    calibration_sequences: int = 512
    refit_sequences: int = 0
    encoder_init_scale: float = 0.1
    skip_init: str = "lstsq"
    model_dtype: str = "float32"
    method: str = "topk"
    sparsity_coef: float = 5e-4
    sparsity_c: float = 1.0
    preact_coef: float = 3e-6
    bandwidth: float = 0.1
    threshold_init: float = 0.1
    decoder_dtype: str = "float32"

    def __post_init__(self):
        for name in ("d_transcoder", "k", "n_tokens", "batch_sequences", "eval_sequences"):
            if getattr(self, name) < 1:
                raise BadInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.d_transcoder:
            raise BadInputError(f"k={self.k} exceeds d_transcoder={self.d_transcoder}")
        if self.ctx_len < 2:
            raise BadInputError(f"ctx_len must be >= 2, got {self.ctx_len}")
        if self.minibatches < 1 or self.minibatches > self.tokens_per_step:
            raise BadInputError(f"minibatches must be in [1, {self.tokens_per_step}], got {self.minibatches}")
        if self.warmup_steps < 0:
            raise BadInputError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.skip_init not in ("lstsq", "zero"):
            raise BadInputError(f"skip_init must be 'lstsq' or 'zero', got {self.skip_init!r}")
        if self.resample_every < 0 or not 0 <= self.resample_until <= 1:
            raise BadInputError(
                f"resample_every must be >= 0 and resample_until in [0, 1], got {self.resample_every}, {self.resample_until}"
            )
        if not 0 < self.lr < 1:
            raise BadInputError(f"lr must be in (0, 1), got {self.lr}")
        if self.method not in ("topk", "jumprelu"):
            raise BadInputError(f"method must be 'topk' or 'jumprelu', got {self.method!r}")
        for name in ("sparsity_coef", "sparsity_c", "preact_coef"):
            if getattr(self, name) < 0:
                raise BadInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bandwidth <= 0 or self.threshold_init <= 0:
            raise BadInputError(f"bandwidth and threshold_init must be > 0, got {self.bandwidth}, {self.threshold_init}")
        for name in ("model_dtype", "decoder_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise BadInputError(f"{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")
        if self.decoder_dtype != "float32" and self.method != "jumprelu":
            raise BadInputError(f"decoder_dtype {self.decoder_dtype!r} applies to method 'jumprelu' (a CLT's dense "
                                f"decoder products), not {self.method!r}; leave it at 'float32'")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_sequences * (self.ctx_len - 1)

    @property
    def n_steps(self) -> int:
        """Optimizer steps: ``minibatches`` per activation batch."""
        return math.ceil(self.n_tokens / self.tokens_per_step) * self.minibatches


#: fields a resumed run may change: they steer what happens next, not what was already learned
#: (a longer ``n_tokens`` extends the run and moves the learning-rate decay)
SCHEDULE_FIELDS = frozenset(
    {"n_tokens", "checkpoint_every_s", "eval_sequences", "calibration_sequences", "refit_sequences", "resample_every",
     "resample_until"}
)


class TopKTrainee(nn.Module):
    """One layer's transcoder while training, in normalised units.

    Parameters: ``W_enc, W_dec [d_transcoder, d_model]``, ``b_enc``, ``b_dec``, ``W_skip``.
    Buffers: ``in_scale``/``out_scale`` (RMS norms of inputs/outputs), ``last_fired`` (tokens
    since each feature last fired).
    """

    def __init__(self, d_model: int, cfg: TrainConfig, generator: torch.Generator):
        super().__init__()
        W = torch.randn(cfg.d_transcoder, d_model, generator=generator)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W.clone())
        self.W_enc = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_transcoder))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model)) if cfg.skip_connection else None
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("out_scale", torch.ones(()))
        self.register_buffer("last_fired", torch.zeros(cfg.d_transcoder))
        self.cfg = cfg

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set normalisers, ``b_dec`` and ``W_skip`` from a first batch of raw activations
        ``[n, d_model]``: ``W_skip`` starts as the ridge-regression fit of ``y`` on ``x``, so
        features only need to learn what the best linear map misses; encoder rows start small
        so the initial features add little noise."""
        d = x.shape[-1]
        self.in_scale.fill_(float(x.norm(dim=-1).mean()) / math.sqrt(d))
        self.out_scale.fill_(float(y.norm(dim=-1).mean()) / math.sqrt(d))
        x_n, y_n = x / self.in_scale, y / self.out_scale
        self.b_dec.copy_(y_n.mean(0))
        self.W_enc.mul_(self.cfg.encoder_init_scale)
        if self.W_skip is not None and self.cfg.skip_init == "lstsq":
            xc, yc = x_n - x_n.mean(0), y_n - y_n.mean(0)
            gram = xc.T @ xc + 1e-2 * len(xc) * torch.eye(d, device=xc.device)
            self.W_skip.copy_(torch.linalg.solve(gram, xc.T @ yc).T)  # y ~ x @ W_skip.T
            self.b_dec.copy_(y_n.mean(0) - x_n.mean(0) @ self.W_skip.T)

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n @ self.W_enc.T + self.b_enc

    def decode_sparse(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")

    def skip(self, x_n: torch.Tensor) -> torch.Tensor:
        return 0.0 if self.W_skip is None else x_n @ self.W_skip.T

    def forward_topk(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """TopK forward on normalised inputs ``[n, d_model]``: returns ``(pre [n, d_transcoder],
        idx [n, k], vals [n, k] (ReLU'd), y_hat [n, d_model] normalised)``."""
        pre = self.pre_activations(x_n)
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        vals = vals.clamp(min=0)
        return pre, idx, vals, self.decode_sparse(idx, vals) + self.b_dec + self.skip(x_n)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(loss, y_hat_normalised, fired_mask [d_transcoder])`` for raw ``x, y [n, d]``."""
        x_n, y_n = x / self.in_scale, y / self.out_scale
        pre, idx, vals, y_hat = self.forward_topk(x_n)
        mean = _token_mean  # over this step's tokens on every rank (one process: a plain mean)
        variance = mean((y_n - mean(y_n.detach())).pow(2).sum(-1)).detach()
        mse = mean((y_hat - y_n).pow(2).sum(-1)) / variance
        fired = torch.zeros(pre.shape[-1], dtype=torch.bool, device=pre.device)
        fired[idx[vals > 0]] = True
        loss = mse
        dead = self.last_fired >= self.cfg.dead_after_tokens
        n_dead = int(dead.sum())
        if n_dead and self.cfg.aux_coef > 0:
            residual = (y_n - y_hat).detach()
            aux_pre = pre.masked_fill(~dead, float("-inf"))
            aux_vals, aux_idx = aux_pre.topk(min(self.cfg.aux_k, n_dead), dim=-1)
            aux_hat = self.decode_sparse(aux_idx, aux_vals.clamp(min=0))
            aux = mean((aux_hat - residual).pow(2).sum(-1)) / mean(residual.pow(2).sum(-1)).detach().clamp(min=1e-8)
            loss = loss + self.cfg.aux_coef * torch.nan_to_num(aux, nan=0.0)
        return loss, y_hat.detach(), fired

    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, generator: torch.Generator) -> int:
        """Re-initialise dead features on the tokens this transcoder explains worst.

        Anthropic's neuron resampling ("Towards Monosemanticity", 2023) adapted to transcoders:
        each dead feature's decoder row becomes the normalised residual ``y - y_hat`` of a token
        drawn with probability proportional to its squared error, its encoder row that token's
        centred input direction scaled to the mean alive encoder norm times 0.2, its bias 0, and
        its Adam moments are reset. Returns the number of features resampled.
        """
        dead = self.last_fired >= self.cfg.dead_after_tokens
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        x_n, y_n = x / self.in_scale, y / self.out_scale
        residual = y_n - self.forward_topk(x_n)[3]
        weights = residual.pow(2).sum(-1)
        tokens = torch.multinomial((weights / weights.sum()).cpu(), n_dead, replacement=True,  # a CPU generator
                                   generator=generator).to(x.device)
        directions = residual[tokens] / residual[tokens].norm(dim=-1, keepdim=True).clamp(min=1e-8)
        inputs = x_n[tokens] - x_n.mean(0)
        inputs = inputs / inputs.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        alive_norm = self.W_enc[~dead].norm(dim=-1).mean() if n_dead < len(dead) else torch.tensor(1.0)
        self.W_dec[dead] = directions
        self.W_enc[dead] = inputs * alive_norm * 0.2
        self.b_enc[dead] = 0.0
        for param in (self.W_dec, self.W_enc, self.b_enc):
            state = opt.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead] = 0.0
        self.last_fired[dead] = 0
        return n_dead

    @torch.no_grad()
    def after_step(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Count tokens since each feature last fired."""
        self.last_fired += n_tokens
        self.last_fired[fired] = 0

    @torch.no_grad()
    def to_transcoder(self, threshold: torch.Tensor) -> PerLayerTranscoder:
        """Fold normalisation into a JumpReLU :class:`PerLayerTranscoder` in raw units."""
        d_transcoder, d_model = self.W_enc.shape
        tc = PerLayerTranscoder(d_model, d_transcoder, "jumprelu", skip_connection=self.W_skip is not None)
        tc.W_enc.copy_(self.W_enc / self.in_scale)
        tc.b_enc.copy_(self.b_enc)
        tc.W_dec.copy_(self.W_dec * self.out_scale)
        tc.b_dec.copy_(self.b_dec * self.out_scale)
        if self.W_skip is not None:
            tc.W_skip.copy_(self.W_skip * (self.out_scale / self.in_scale))
        tc.activation_function.threshold.copy_(threshold)
        return tc


def _token_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the first dimension (tokens) of this step's tokens on every rank: in one process
    ``values.mean(0)``; under torch.distributed the local sum over the global count, so that the
    gradients summed over the ranks are those of the global batch's loss (and the value, summed over
    the ranks, is its mean). Statistics detached from the graph (a loss normaliser) are all-reduced so
    every rank divides by the global value."""
    world = distributed.world_size()
    if world == 1:
        return values.mean(0)
    total = values.sum(0) / (values.shape[0] * world)  # every rank holds the same number of tokens
    if total.requires_grad:
        return total
    total = total.clone()
    distributed.all_reduce_sum_([total])
    return total


# ----------------------------------------------------------------------------- phases
def _optimizer_step(trainees, opt, xs, ys, lr: float, running: list[float]) -> None:
    """One Adam step on every layer's transcoder; ``running`` keeps an EMA of each layer's loss.

    Under torch.distributed each rank holds its share of the step's tokens: gradients, losses and
    firing masks are summed (or OR-ed) over the ranks before the step, so every rank takes the same
    step as one process would on the whole batch."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    losses, fired_masks = [], []
    for tr, x, y in zip(trainees, xs, ys):
        loss, _, fired = tr.loss(x, y)
        loss.backward()
        losses.append(loss.detach())
        fired_masks.append(fired)
    world = distributed.world_size()
    if world > 1:
        losses, fired_masks = reduce_step(trainees.parameters(), losses, fired_masks)
    for layer, (tr, fired) in enumerate(zip(trainees, fired_masks)):
        running[layer] = 0.98 * running[layer] + 0.02 * float(losses[layer])
        tr.after_step(fired, xs[layer].shape[0] * world)
    opt.step()
    with torch.no_grad():
        for tr in trainees:
            tr.W_dec /= tr.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)


def reduce_step(parameters, values: list[torch.Tensor], fired: list[torch.Tensor]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Make a data-parallel step the whole batch's: every gradient and every value (0-dim tensors, e.g.
    each layer's loss) summed over the ranks, the firing masks OR-ed. Returns ``(values, fired)``."""
    total = torch.stack(values)
    distributed.all_reduce_sum_([p.grad for p in parameters if p.grad is not None] + [total])
    masks = torch.stack(fired).to(torch.uint8)
    distributed.all_reduce_max_(masks)
    return list(total), list(masks.bool())


def rank_rows(n_sequences: int, minibatches: int) -> list[int]:
    """The sequences of a batch this rank computes activations for. Each of the ``minibatches``
    optimizer steps of a batch reads a contiguous block of its sequences; every rank takes an equal
    contiguous share of each block, so the ranks' minibatch ``m`` together are one process's
    minibatch ``m`` (and :func:`gather_rows` restores one process's token order).

    Raises:
        BadInputError: ``n_sequences`` is not a multiple of ``minibatches * world_size``.
    """
    world = distributed.world_size()
    if world == 1:
        return list(range(n_sequences))
    if n_sequences % (minibatches * world):
        raise BadInputError(f"--batch-sequences {n_sequences} must be a multiple of minibatches ({minibatches}) x "
                            f"world size ({world}) to split each step evenly over the ranks")
    share = n_sequences // (minibatches * world)
    block = share * world
    r = distributed.rank()
    return [m * block + r * share + j for m in range(minibatches) for j in range(share)]


def gather_rows(x: torch.Tensor, minibatches: int) -> torch.Tensor:
    """Every rank's ``[n_local, ...]`` token rows of a batch, in one process's order (see :func:`rank_rows`)."""
    parts = distributed.all_gather_tensors(x)
    if len(parts) == 1:
        return x
    blocks = torch.stack([p.reshape(minibatches, -1, *p.shape[1:]) for p in parts], dim=1)  # (M, world, n/M, ...)
    return blocks.reshape(-1, *x.shape[1:])


def _activations(adapter: ModelAdapter, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ids = torch.as_tensor(batch)
    ins, outs = adapter.run_with_mlp_sites(ids)
    d = adapter.d_model
    # drop BOS (position 0): (B, T, d) -> (B*(T-1), d)
    return ([x[:, 1:].reshape(-1, d).float() for x in ins], [y[:, 1:].reshape(-1, d).float() for y in outs])


def _lr(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    decay_start = cfg.n_steps * (1 - cfg.decay_fraction)
    decay = 1.0 if step < decay_start else max(0.0, (cfg.n_steps - step) / (cfg.n_steps - decay_start))
    return cfg.lr * warm * max(decay, 0.02)


def _save_checkpoint(path: Path, trainees: nn.ModuleList, opt: torch.optim.Optimizer, state: dict,
                     every_rank: bool = False) -> None:
    """Rank 0 writes (atomically); every rank holds the same state, so the others only wait. With
    ``every_rank`` (feature-sharded training, where each rank holds its own slice) each rank writes
    its own ``path``."""
    if not distributed.is_main() and not every_rank:
        distributed.barrier()
        return
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainees.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for key, value in s.items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    _write_checkpoint(path, tensors, state)
    distributed.barrier()


def _write_checkpoint(path: Path, tensors: dict, state: dict) -> None:
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))


def _load_checkpoint(path: Path, trainees: nn.ModuleList, opt: torch.optim.Optimizer) -> dict:
    tensors = load_file(str(path / "state.safetensors"))
    trainees.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = opt.state_dict()
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            per_param.setdefault(int(i), {})[name] = value
    opt_state["state"] = per_param
    opt.load_state_dict(opt_state)
    return json.loads((path / "state.json").read_text())


@torch.no_grad()
def _calibrate(
    adapter: ModelAdapter, trainees: nn.ModuleList, calib: TokenStream, cfg: TrainConfig
) -> list[PerLayerTranscoder]:
    """JumpReLU transcoders whose per-feature thresholds match TopK firing rates on calibration text."""
    n_layers = len(trainees)
    pre_chunks: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    fire_counts = [torch.zeros(cfg.d_transcoder) for _ in range(n_layers)]
    n_calib = 0
    for i, (_, batch) in enumerate(calib.batches(cfg.batch_sequences)):
        if i * cfg.batch_sequences >= cfg.calibration_sequences:
            break
        xs, _ = _activations(adapter, batch)
        for layer, tr in enumerate(trainees):
            pre = tr.pre_activations(xs[layer] / tr.in_scale)
            vals, idx = pre.topk(cfg.k, dim=-1)
            fire_counts[layer] += torch.bincount(idx[vals > 0], minlength=cfg.d_transcoder).float().cpu()
            pre_chunks[layer].append(pre.half().cpu())
        n_calib += xs[0].shape[0]
    transcoders = []
    for layer, tr in enumerate(trainees):
        pre = torch.cat(pre_chunks[layer]).float()  # (n_calib, d_transcoder)
        alive = (tr.last_fired < cfg.dead_after_tokens).cpu()
        transcoders.append(tr.to_transcoder(calibrated_thresholds(pre, fire_counts[layer], alive)))
        pre_chunks[layer] = []
    return transcoders


def calibrated_thresholds(
    pre: Float[torch.Tensor, "n d_transcoder"], fire_counts: Float[torch.Tensor, "d_transcoder"],
    alive: Bool[torch.Tensor, "d_transcoder"],
) -> Float[torch.Tensor, "d_transcoder"]:
    """JumpReLU thresholds that reproduce each feature's TopK firing rate on calibration tokens.

    A feature that fired ``c`` times among the ``n`` tokens gets the ``(1 - c / n)`` quantile of
    its pre-activations. A feature that never fired there but fired in training's last
    ``dead_after_tokens`` (``alive``) is rarer than ``1 / n``: it gets the largest pre-activation
    seen, the best estimate of that quantile the sample allows, instead of being switched off. A
    feature dead in training too gets a threshold above every value seen. Thresholds are >= 0.
    """
    n = pre.shape[0]
    rate = fire_counts / n
    sorted_pre = pre.sort(dim=0).values
    rank = ((1 - rate) * (n - 1)).round().long().clamp(0, n - 1)
    threshold = sorted_pre.gather(0, rank[None]).squeeze(0)
    unseen = torch.where(alive, sorted_pre[-1], sorted_pre[-1] + 1.0)
    return torch.where(rate > 0, threshold, unseen).clamp(min=0)


@torch.no_grad()
def evaluate_transcoders(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    heldout: TokenStream,
    n_sequences: int,
    batch_sequences: int = 16,
    storage_dtype: torch.dtype | None = torch.bfloat16,
) -> list[LayerMetrics]:
    """Held-out FVU, L0 and dead fraction of every layer's transcoder, per-layer or cross-layer (FVU
    of each output layer's reconstruction, L0 and dead fraction of each layer's features).

    Args:
        heldout: the held-out token stream; its first ``n_sequences`` sequences are used.
        storage_dtype: round the weights through this dtype first, so the figures describe the
            set as saved (``None`` keeps them as they are).
    """
    if storage_dtype is not None or next(transcoders.parameters()).device != adapter.device:
        transcoders = copy.deepcopy(transcoders).to(adapter.device)  # the caller's set stays where it is
    if storage_dtype is not None:
        for p in transcoders.parameters():
            p.copy_(p.to(storage_dtype).float())
    accs = [MetricsAccumulator(layer, transcoders.d_transcoder(layer)) for layer in range(transcoders.n_layers)]
    for i, (_, batch) in enumerate(heldout.batches(batch_sequences)):
        if i * batch_sequences >= n_sequences:
            break
        xs, ys = _activations(adapter, batch[: n_sequences - i * batch_sequences])  # exactly n_sequences
        acts = [transcoders.encode(layer, x) for layer, x in enumerate(xs)]
        # through the TranscoderSet interface: a CLT's output at a layer sums every earlier layer's features
        for layer, (acc, y_hat) in enumerate(zip(accs, transcoders.reconstruct(acts, xs))):
            acc.update(ys[layer], y_hat, acts[layer])
    return [a.result() for a in accs]


def train_transcoders(
    adapter: ModelAdapter,
    train_stream: TokenStream,
    heldout_stream: TokenStream,
    cfg: TrainConfig,
    out: Path,
    checkpoint_dir: Path,
    progress: bool = True,
    eval_adapter=None,
    heldout_by_kind: dict[str, TokenStream] | None = None,
) -> tuple[PerLayerTranscoderSet, list[LayerMetrics]]:
    """Train, checkpoint, resume, calibrate, evaluate and save a transcoder set.

    Args:
        adapter: the model whose activations train the transcoders (``cfg.model_dtype``).
        out: directory the finished set is written to (circuit-tracer layout).
        checkpoint_dir: where the resumable state lives (resumes if it holds a checkpoint made
            with the same config).
        eval_adapter: the model (a callable returning it, so it is loaded only when needed) used
            for calibration and held-out figures, e.g. the float32 model when training read a
            bfloat16 one; default ``adapter``.
        heldout_by_kind: more held-out streams (e.g. ``{"corpus": ..., "chat": ...}``) evaluated
            the same way; their figures go into ``config.yaml`` as ``heldout_metrics_by_kind``.

    Returns:
        the set and per-layer held-out metrics on ``heldout_stream`` (also written into ``config.yaml``);
        ``(None, [])`` on ranks other than 0 under torch.distributed (rank 0 calibrates, evaluates and
        saves).

    Raises:
        BadInputError: a checkpoint from a different config is in ``checkpoint_dir``; a method other
            than ``topk``.
    """
    if cfg.method != "topk":
        raise BadInputError(f"method {cfg.method!r} trains cross-layer transcoders only (train --kind clt); "
                            "per-layer sets train with method 'topk'")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    world = distributed.world_size()
    rows = rank_rows(cfg.batch_sequences, cfg.minibatches)
    trainees = nn.ModuleList(TopKTrainee(adapter.d_model, cfg, generator) for _ in range(adapter.n_layers))
    trainees.to(adapter.device)
    opt = torch.optim.Adam(trainees.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    ckpt = checkpoint_dir / "checkpoint"
    state = {"config": asdict(cfg), "step": 0, "index": 0, "tokens": 0, "history": [], "world_size": world}
    if (ckpt / "state.json").exists():
        saved = json.loads((ckpt / "state.json").read_text())
        check_world_size(ckpt, saved)
        changed = changed_on_resume(ckpt, saved["config"], cfg)
        state = _load_checkpoint(ckpt, trainees, opt)
        if changed:
            logger.warning("resuming with changed %s: %s", sorted(changed), changed)
            state["config"] = asdict(cfg)
        logger.info("resumed at step %d (%d tokens)", state["step"], state["tokens"])
    stream = train_stream.batches(cfg.batch_sequences, start=state["index"])
    bar = tqdm(total=cfg.n_steps, initial=state["step"], disable=not progress or not distributed.is_main(),
               desc="training", unit="step")
    last_save = time.monotonic()
    running = [1.0] * adapter.n_layers
    while state["step"] < cfg.n_steps:
        index, batch = next(stream)
        xs, ys = _activations(adapter, batch[rows])  # this rank's share of the batch
        if state["step"] == 0:  # from the whole batch, in one process's order, on every rank
            for tr, x, y in zip(trainees, xs, ys):
                tr.initialize(gather_rows(x, cfg.minibatches), gather_rows(y, cfg.minibatches))
        for part in torch.arange(xs[0].shape[0]).chunk(cfg.minibatches):
            _optimizer_step(trainees, opt, [x[part] for x in xs], [y[part] for y in ys], _lr(cfg, state["step"]), running)
            state["step"] += 1
        if resample_due(cfg, state["step"]):
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["step"])
            resampled = [tr.resample_dead(gather_rows(x, cfg.minibatches), gather_rows(y, cfg.minibatches), opt, generator)
                         for tr, x, y in zip(trainees, xs, ys)]
            logger.info("step %d: resampled %s dead features", state["step"], resampled)
        state.update(index=index, tokens=state["tokens"] + xs[0].shape[0] * world)
        bar.update(cfg.minibatches)
        if state["step"] % 100 < cfg.minibatches:
            dead = [float((tr.last_fired >= cfg.dead_after_tokens).float().mean()) for tr in trainees]
            state["history"].append({"step": state["step"], "tokens": state["tokens"],
                                     "loss": [round(r, 4) for r in running], "dead": [round(d, 4) for d in dead]})
            bar.set_postfix(loss=f"{sum(running) / len(running):.3f}", dead=f"{max(dead):.2f}")
        if time.monotonic() - last_save > cfg.checkpoint_every_s or state["step"] >= cfg.n_steps:
            _save_checkpoint(ckpt, trainees, opt, state)
            last_save = time.monotonic()
            logger.info("checkpoint at step %d, %d tokens", state["step"], state["tokens"])
    bar.close()
    if not distributed.is_main():  # rank 0 calibrates, evaluates and saves
        distributed.barrier()
        return None, []
    evaluator = adapter if eval_adapter is None else eval_adapter()
    calib = TokenStream(train_stream.corpus, train_stream.tokenizer, cfg.ctx_len, "train", seed=cfg.seed + 1,
                        sources=train_stream.sources)
    result = PerLayerTranscoderSet(_calibrate(evaluator, trainees, calib, cfg), model_name=adapter.name, scan=out.name)
    refit_gains = None
    if cfg.refit_sequences:
        from mechscope.training.refit import refit_decoders

        fit = TokenStream(train_stream.corpus, train_stream.tokenizer, cfg.ctx_len, "train", seed=cfg.seed + 2,
                          sources=train_stream.sources)
        refit_gains = refit_decoders(evaluator, result, fit, cfg.refit_sequences, cfg.batch_sequences)
        logger.info("decoder refit removed %s of the squared error per layer", [round(g, 3) for g in refit_gains])
    metrics = evaluate_transcoders(evaluator, result, heldout_stream, cfg.eval_sequences, cfg.batch_sequences)
    by_kind = {kind: [m.as_dict() for m in evaluate_transcoders(evaluator, result, stream, cfg.eval_sequences,
                                                                cfg.batch_sequences)]
               for kind, stream in (heldout_by_kind or {}).items()}
    extra = {
        "training": {**asdict(cfg), "tokens_trained": state["tokens"],
                     "method": "TopK + AuxK, JumpReLU calibrated" + (", decoders refit" if refit_gains else ""),
                     **({"refit_gain": [round(g, 4) for g in refit_gains]} if refit_gains else {}),
                     "corpus": [{"source": e["source"], "weight": e["weight"]} for e in train_stream.manifest["sources"]]},
        "heldout_metrics": [m.as_dict() for m in metrics],
        **({"heldout_metrics_by_kind": by_kind} if by_kind else {}),
    }
    save_transcoder_set(result, out, dtype=torch.bfloat16, extra_config=extra)
    distributed.barrier()
    return result, metrics


def changed_on_resume(ckpt: Path, saved_config: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """``{field: (saved, now)}`` of the config fields a resume changes (a field newer than the
    checkpoint counts as its default there).

    Raises:
        BadInputError: a changed field outside :data:`SCHEDULE_FIELDS` (the run would not be the same).
    """
    defaults, now = asdict(TrainConfig()), asdict(cfg)
    changed = {k: (saved_config.get(k, defaults[k]), v) for k, v in sorted(now.items())
               if saved_config.get(k, defaults[k]) != v}
    fixed = [k for k in changed if k not in SCHEDULE_FIELDS]
    if fixed:
        raise BadInputError(
            f"{ckpt} holds a run with a different config ({', '.join(fixed)}); delete it or use another "
            f"--checkpoint-dir (only {', '.join(sorted(SCHEDULE_FIELDS))} may change on resume)"
        )
    return changed


def resample_due(cfg: TrainConfig, step: int) -> bool:
    """Whether dead features are resampled after the activation batch that ended at optimizer step
    ``step`` (``cfg.minibatches`` steps a batch): a multiple of ``resample_every`` was crossed within
    the first ``resample_until`` of training."""
    return bool(cfg.resample_every) and step // cfg.resample_every != (step - cfg.minibatches) // cfg.resample_every \
        and step < cfg.resample_until * cfg.n_steps


def check_world_size(ckpt: Path, saved: dict) -> None:
    """A checkpoint resumes exactly only with the world size it was written with (each rank's share
    of every batch depends on it).

    Raises:
        BadInputError: another world size.
    """
    had, now = saved.get("world_size", 1), distributed.world_size()
    if had != now:
        raise BadInputError(f"{ckpt} was written by {had} process(es); resume it with the same number "
                            f"(torchrun --nproc-per-node {had}), not {now}, or use another --checkpoint-dir")
