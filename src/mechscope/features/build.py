"""Build a feature store: stream a corpus through the model and the transcoders.

Pass 1 (all ``n_tokens``): each batch of sequences runs the model body once (recording every
layer's MLP input), every layer's transcoder encodes it, and :class:`FeatureStatistics` folds the
activations in. Pass 2 (the first ``quantile_tokens`` of the same stream): with every feature's
maximum known, :class:`QuantileExamples` samples examples within activation intervals. State is
checkpointed atomically every ``checkpoint_every_s`` seconds (safetensors + JSON) and a killed
build resumes exactly, in either pass. At the end, each feature's top and bottom direct logit
effects are computed and everything is written to SQLite (:mod:`mechscope.features.store`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mechscope import distributed
from mechscope.data.corpus import TokenStream
from mechscope.errors import BadInputError
from mechscope.features.dense import logit_effects
from mechscope.features.statistics import HIST_EDGES, FeatureStatistics, QuantileExamples
from mechscope.features.store import write_store
from mechscope.paths import atomic_directory
from mechscope.progress import Progress
from mechscope.replacement.replacement_model import ReplacementModel

__all__ = ["build_feature_store"]

logger = logging.getLogger(__name__)


def _save(path: Path, stats: FeatureStatistics, quantiles: QuantileExamples | None, state: dict) -> None:
    with atomic_directory(path) as tmp:
        save_file({k: v.contiguous() for k, v in stats.state().items()}, str(tmp / "stats.safetensors"))
        if quantiles is not None:
            save_file({k: v.contiguous() for k, v in quantiles.state().items()}, str(tmp / "quantiles.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))


@torch.no_grad()
def _logit_tokens(rm: ReplacementModel, n_top: int, chunk: int = 256) -> tuple[list, list]:
    decode = rm.model.tokenizer.decode
    pos, neg = [], []
    for layer in range(rm.model.n_layers):
        for features in torch.arange(rm.transcoders.d_transcoder(layer)).split(chunk):
            effects = logit_effects(rm.model, rm.transcoders, layer, features)
            top, bottom = effects.topk(n_top, dim=1), (-effects).topk(n_top, dim=1)
            pos += [[[decode([int(i)]), round(float(v), 4)] for i, v in zip(ids, vals)]
                    for ids, vals in zip(top.indices, top.values)]
            neg += [[[decode([int(i)]), round(-float(v), 4)] for i, v in zip(ids, vals)]
                    for ids, vals in zip(bottom.indices, bottom.values)]
    return pos, neg


def build_feature_store(
    rm: ReplacementModel,
    stream: TokenStream,
    n_tokens: int,
    out: Path,
    checkpoint_dir: Path,
    batch_sequences: int = 8,
    top_k: int = 20,
    window: int = 32,
    n_logit_tokens: int = 10,
    quantile_tokens: int = 262_144,
    n_intervals: int = 10,
    per_interval: int = 2,
    checkpoint_every_s: float = 300.0,
    progress: Progress | bool = True,
) -> Path:
    """Stream ``n_tokens`` (non-BOS) tokens, then sample quantile examples from the first
    ``quantile_tokens`` of them, and write the store to ``out``.

    Raises:
        BadInputError: ``n_tokens`` < 1, ``quantile_tokens`` < 0, or a checkpoint from a different
            build in ``checkpoint_dir``.
    """
    if n_tokens < 1:
        raise BadInputError(f"--tokens must be >= 1, got {n_tokens}")
    if quantile_tokens < 0:
        raise BadInputError(f"--quantile-tokens must be >= 0, got {quantile_tokens}")
    progress = Progress.of(progress)
    n_layers = rm.model.n_layers
    d_transcoder = rm.transcoders.d_transcoder(0)
    per_sequence = stream.ctx_len - 1
    n_sequences = -(-n_tokens // per_sequence)
    n_quantile_sequences = min(-(-quantile_tokens // per_sequence), n_sequences)
    identity = {"model": rm.model.name, "transcoders": rm.transcoders.scan, "ctx_len": stream.ctx_len,
                "seed": stream.seed, "mix": stream.mix, "top_k": top_k, "window": window,
                "batch_sequences": batch_sequences, "n_quantile_sequences": n_quantile_sequences,
                "n_intervals": n_intervals, "per_interval": per_interval}
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1:  # rank r takes batches r, r + world, ...; each keeps its own checkpoint
        identity["world_size"] = world
    stats = FeatureStatistics(n_layers, d_transcoder, top_k, window)
    quantiles = None
    ckpt = _rank_checkpoint(checkpoint_dir, rank, world)
    state = {"identity": identity, "phase": "top", "next_sequence": rank * batch_sequences}
    if (ckpt / "state.json").exists():
        saved = json.loads((ckpt / "state.json").read_text())
        if saved["identity"] != identity:
            raise BadInputError(f"{ckpt} holds a build with other settings ({saved['identity']}); delete it or use "
                                "another --checkpoint-dir")
        state = saved
        stats.load_state(load_file(str(ckpt / "stats.safetensors")))
        if state["phase"] == "quantiles":
            merged = _merged_statistics(checkpoint_dir, world) if world > 1 else stats
            quantiles = QuantileExamples(merged.max_value, n_intervals, per_interval, window, seed=stream.seed)
            quantiles.load_state(load_file(str(ckpt / "quantiles.safetensors")))
        logger.info("resumed at sequence %d of the %s pass", state["next_sequence"], state["phase"])

    def stream_pass(total: int, fold, description: str) -> None:
        bar = progress.bar(total=total * per_sequence, initial=state["next_sequence"] * per_sequence, unit="tok",
                           unit_scale=True, desc=description)
        last_save = time.monotonic()
        while state["next_sequence"] < total:
            start = state["next_sequence"]  # this rank's batches start every world * batch_sequences
            count = min(batch_sequences, total - start)
            batch = torch.as_tensor(np.stack([stream.sequence(i) for i in range(start, start + count)]))
            inputs, _ = rm.model.run_with_mlp_sites(batch)
            sequences = torch.arange(start, start + count)
            for layer in range(n_layers):
                fold(layer, sequences, rm.transcoders.encode(layer, inputs[layer].float()).cpu())  # statistics: CPU
            state["next_sequence"] = min(total, start + world * batch_sequences)
            bar.update(count * per_sequence)
            if time.monotonic() - last_save > checkpoint_every_s:
                _save(ckpt, stats, quantiles, state)
                last_save = time.monotonic()
        bar.close()

    if state["phase"] == "top":
        stream_pass(n_sequences, stats.update, "features")
        merged = stats
        if world > 1:  # every rank samples quantiles against the maxima of the whole corpus
            _save(ckpt, stats, None, state)
            distributed.barrier()
            merged = _merged_statistics(checkpoint_dir, world)
        quantiles = QuantileExamples(merged.max_value, n_intervals, per_interval, window, seed=stream.seed)
        state.update(phase="quantiles", next_sequence=rank * batch_sequences)
        _save(ckpt, stats, quantiles, state)
    stream_pass(n_quantile_sequences, quantiles.update, "quantiles")
    _save(ckpt, stats, quantiles, state)
    if world > 1:
        distributed.barrier()
        if not distributed.is_main():  # rank 0 merges every rank's part and writes the store
            distributed.barrier()
            return out
        stats = merged  # the first pass's statistics of every rank, merged before the quantile pass
        quantiles = QuantileExamples.merged([_load_quantiles(checkpoint_dir, r, world, stats.max_value, quantiles)
                                             for r in range(world)])
    written = _write(rm, stream, stats, quantiles, n_quantile_sequences * per_sequence, out, n_logit_tokens, progress)
    distributed.barrier()
    return written


def _rank_checkpoint(checkpoint_dir: Path, rank: int, world: int) -> Path:
    return checkpoint_dir / ("checkpoint" if world == 1 else f"checkpoint-rank{rank}-of-{world}")


def _merged_statistics(checkpoint_dir: Path, world: int) -> FeatureStatistics:
    """Every rank's first-pass statistics (from its checkpoint), merged (:meth:`FeatureStatistics.merged`)."""
    parts = []
    for r in range(world):
        tensors = load_file(str(_rank_checkpoint(checkpoint_dir, r, world) / "stats.safetensors"))
        n_layers, top_k, d_transcoder, window = tensors["top_acts"].shape
        part = FeatureStatistics(n_layers, d_transcoder, top_k, window)  # the build's settings
        part.load_state(tensors)
        parts.append(part)
    return FeatureStatistics.merged(parts)


def _load_quantiles(checkpoint_dir: Path, rank: int, world: int, max_value: torch.Tensor,
                    like: QuantileExamples) -> QuantileExamples:
    part = QuantileExamples(max_value, like.n_intervals, like.per_interval, like.window, like.before, like.seed)
    part.load_state(load_file(str(_rank_checkpoint(checkpoint_dir, rank, world) / "quantiles.safetensors")))
    return part


def _write(rm: ReplacementModel, stream: TokenStream, stats: FeatureStatistics, quantiles: QuantileExamples,
           n_quantile_tokens: int, out: Path, n_logit_tokens: int, progress: Progress) -> Path:
    progress.phase("collecting examples")
    L, F = stats.n_layers, stats.d_transcoder
    layer = torch.arange(L)[:, None].expand(L, F).reshape(-1)
    feature = torch.arange(F)[None, :].expand(L, F).reshape(-1)
    features = {
        "layer": layer.numpy(), "feature": feature.numpy(), "active": stats.active.reshape(-1).long().numpy(),
        "density": (stats.active / max(stats.n_tokens, 1)).reshape(-1).numpy(),
        "max_value": stats.max_value.reshape(-1).numpy(), "hist": stats.hist.reshape(L * F, -1).numpy(),
    }
    lay, rank, feat = (stats.top_value > 0).nonzero(as_tuple=True)  # [L, K, F]
    top_acts = stats.top_acts[lay, rank, feat]
    top_start = stats.top_start[lay, rank, feat]
    lay_q, interval, slot, feat_q = torch.isfinite(quantiles.key).nonzero(as_tuple=True)  # [L, Q, K, F]
    q_index = (lay_q, interval, slot, feat_q)
    examples = {
        "layer": torch.cat([lay, lay_q]), "feature": torch.cat([feat, feat_q]),
        "kind": ["top"] * len(lay) + ["quantile"] * len(lay_q),
        "interval": torch.cat([torch.full_like(lay, -1), interval]), "rank": torch.cat([rank, slot]),
        "sequence": torch.cat([stats.top_sequence[lay, rank, feat], quantiles.sequence[q_index]]),
        "start": torch.cat([top_start, quantiles.start[q_index]]),
        "position": torch.cat([top_start + top_acts.float().argmax(1), quantiles.position[q_index]]),
        "value": torch.cat([stats.top_value[lay, rank, feat], quantiles.value[q_index]]),
        "acts": torch.cat([top_acts, quantiles.acts[q_index]]).float(),
    }
    examples = {k: v if isinstance(v, list) else v.numpy() for k, v in examples.items()}
    decode = rm.model.tokenizer.decode
    sequences = {int(s): [decode([int(t)]) for t in stream.sequence(int(s))]
                 for s in np.unique(examples["sequence"])}
    progress.phase(f"direct logit effects of {L * F:,} features")
    pos, neg = _logit_tokens(rm, n_logit_tokens)
    progress.phase(f"writing the store ({len(examples['layer']):,} examples) to {out}")
    meta = {"model": rm.model.name, "transcoders": rm.transcoders.scan, "n_tokens": stats.n_tokens,
            "hist_edges": HIST_EDGES.tolist(), "window": stats.window, "top_k": stats.top_k,
            "n_intervals": quantiles.n_intervals, "per_interval": quantiles.per_interval,
            "corpus": [{"source": e["source"], "weight": e["weight"]} for e in stream.manifest["sources"]],
            "quantile_tokens": n_quantile_tokens,
            "ctx_len": stream.ctx_len, "seed": stream.seed, "mix": stream.mix}
    return write_store(out, meta, features, examples, sequences, {"pos": pos, "neg": neg})
