"""``attribute``: build the attribution graph of a prompt.

Phases, in the order of Ameisen et al. 2025 ("Circuit Tracing", sections 2-3) and circuit-tracer's
``attribute``:

1. **trace**: clean run, feature activations, errors (:class:`ReplacementModel`).
2. **targets**: logit targets and their demeaned unembedding vectors.
3. **frozen graph**: one batched forward pass of the frozen local replacement model.
4. **logit rows**: one backward pass per batch of logit targets gives every source's direct effect
   on each target logit.
5. **feature rows**: features are visited in order of their (partial) influence on the logits,
   recomputed every ``update_interval`` batches, until ``max_feature_nodes`` are visited; each
   backward pass gives the direct effects of every source on a batch of feature pre-activations.
6. **assemble**: keep the visited features as feature nodes, add error, token and logit nodes.

Edge weight source -> target = (source activation x decoder vector) . J▼ . (target input vector),
with J▼ the Jacobian of the frozen model; for error nodes the error vector replaces the scaled
decoder, for token nodes the embedding does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from mechscope.attribution.edge_rows import EdgeRows
from mechscope.attribution.targets import select_logit_targets
from mechscope.progress import Progress
from mechscope.errors import BadInputError
from mechscope.graph.graph import Graph
from mechscope.memory import release_free_memory
from mechscope.replacement.replacement_model import FrozenReplacement, ReplacementModel, Trace

__all__ = ["AttributionConfig", "attribute", "SourceVectors"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of one attribution.

    Attributes:
        max_n_logits: at most this many logit targets (>= 1).
        desired_logit_prob: add top tokens until their cumulative probability reaches this (0, 1].
        targets: tokens to explain instead (each a single token); empty = top tokens.
        logit_diff: ``(A, B)``: explain one target, the logit of A minus the logit of B (each a
            single token; circuit-tracer's ``CustomTarget``, Neuronpedia's ``logitDiff``); replaces
            ``targets`` and the top tokens.
        batch_size: target rows per backward pass (>= 1).
        max_feature_nodes: feature nodes kept, chosen by influence; ``None`` keeps every active one.
        update_interval: batches between re-rankings of features by influence (>= 1).
        prefix_blocks: the prompt is cut into this many blocks of positions (>= 1; 1 = off); a
            batch of feature targets whose positions all lie in the first ``b`` blocks is
            back-propagated through a frozen replacement model of that prefix only. Attention is
            causal, so the gradients at earlier positions are the same (tested to float rounding)
            and the backward passes of a long prompt cost what their prefixes cost.
    """

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    targets: tuple[str, ...] = ()
    logit_diff: tuple[str, str] | None = None
    batch_size: int = 64
    max_feature_nodes: int | None = 8192
    update_interval: int = 4
    prefix_blocks: int = 4

    def __post_init__(self):
        if self.max_n_logits < 1:
            raise BadInputError(f"max_n_logits must be >= 1, got {self.max_n_logits}")
        if not 0 < self.desired_logit_prob <= 1:
            raise BadInputError(f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob}")
        if self.batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise BadInputError(f"max_feature_nodes must be >= 0, got {self.max_feature_nodes}")
        if self.update_interval < 1:
            raise BadInputError(f"update_interval must be >= 1, got {self.update_interval}")
        if self.prefix_blocks < 1:
            raise BadInputError(f"prefix_blocks must be >= 1, got {self.prefix_blocks}")
        if self.logit_diff is not None:
            if len(self.logit_diff) != 2 or self.logit_diff[0] == self.logit_diff[1]:
                raise BadInputError(f"--logit-diff takes two different tokens A B, got {list(self.logit_diff)}")
            if self.targets:
                raise BadInputError("--logit-diff A B is the one target; leave out --target")


@dataclass
class SourceVectors:
    """What each source contributes, per layer, before the Jacobian.

    Attributes:
        layer_slices: per layer, the slice of ``trace.active`` holding that layer's features.
        positions: per layer ``[n_layer]`` positions of its active features.
        scaled_decoders: per layer ``[n_layer, n_out, d_model]`` activation x decoder vectors.
        out_layers: per layer, the output layers of its features.
        errors: per layer ``[pos, d_model]`` error vectors (each on its layer's device); embeddings: ``[pos, d_model]``.
    """

    layer_slices: list[slice]
    positions: list[torch.Tensor]
    scaled_decoders: list[torch.Tensor]
    out_layers: list[range]
    errors: list[torch.Tensor]
    embeddings: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, rm: ReplacementModel, trace: Trace) -> SourceVectors:
        slices, positions, decoders, outs = [], [], [], []
        layers = trace.active[:, 0]
        for layer in range(rm.model.n_layers):
            idx = (layers == layer).nonzero().flatten()
            sl = slice(int(idx[0]), int(idx[-1]) + 1) if len(idx) else slice(0, 0)
            rows = trace.active[sl]
            vectors = rm.transcoders.decoder_vectors(layer, rows[:, 2]).float()
            slices.append(sl)
            positions.append(rows[:, 1])
            decoders.append(trace.active_values[sl].to(vectors.device)[:, None, None] * vectors)  # (n, n_out, d)
            outs.append(rm.transcoders.output_layers(layer))
        return cls(slices, positions, decoders, outs, list(trace.errors), trace.run.embeddings.float())

    def width(self, n_source_layers: int) -> int:
        """Number of active features in layers ``< n_source_layers`` (a prefix of ``trace.active``)."""
        return self.layer_slices[n_source_layers - 1].stop if n_source_layers else 0

    @torch.no_grad()
    def edges(self, grads: list[torch.Tensor], grad_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Direct effects on a batch of targets from source-site gradients.

        Args:
            grads: per source layer ``l < n_source_layers`` the ``[batch, pos, d_model]`` gradient
                at its MLP output site (later layers cannot reach the targets).
            grad_embed: ``[batch, pos, d_model]`` gradient at the embedding.

        Returns:
            ``(features [batch, width], others [batch, (n_layers + 1) * pos])``: edges from the
            active features of layers ``< n_source_layers``, and from error then token nodes.
        """
        batch, n_pos, _ = grad_embed.shape
        n_source_layers, n_layers = len(grads), len(self.layer_slices)
        features = torch.empty(batch, self.width(n_source_layers), device=grad_embed.device)
        for layer, sl in enumerate(self.layer_slices[:n_source_layers]):
            if sl.stop == sl.start:
                continue
            # active features of a layer are sorted by position: one (B, d) x (d, n_p) product
            # per position block keeps the work at B * n * d
            positions, counts = self.positions[layer].unique_consecutive(return_counts=True)
            start = sl.start
            for pos, count in zip(positions.tolist(), counts.tolist()):
                block = features[:, start : start + count]
                block.zero_()
                local = slice(start - sl.start, start - sl.start + count)
                for o, out_layer in enumerate(self.out_layers[layer]):
                    if out_layer < n_source_layers:  # .to: a no-op unless a device map split the layers
                        block += (grads[out_layer][:, pos] @ self.scaled_decoders[layer][local, o].T).to(block.device)
                start += count
        others = torch.zeros(batch, (n_layers + 1) * n_pos, device=grad_embed.device)
        for layer, grad in enumerate(grads):
            others[:, layer * n_pos : (layer + 1) * n_pos] = torch.einsum("pd,bpd->bp", self.errors[layer], grad).to(others.device)
        others[:, n_layers * n_pos :] = torch.einsum("pd,bpd->bp", self.embeddings, grad_embed)
        return features, others


class _Prefixes:
    """Frozen replacement models of the prompt's prefixes (``config.prefix_blocks`` block lengths),
    built on first use and kept for the whole attribution."""

    def __init__(self, rm: ReplacementModel, trace: Trace, full: FrozenReplacement, blocks: int):
        self.rm, self.trace, self.batch = rm, trace, full.batch
        self.block = -(-trace.n_pos // blocks)
        self.models = {trace.n_pos: full}

    def length(self, last_position: int) -> int:
        """The shortest prefix length of whole blocks that holds ``last_position``."""
        return min(self.trace.n_pos, -(-(last_position + 1) // self.block) * self.block)

    def __call__(self, n: int) -> FrozenReplacement:
        if n not in self.models:
            self.models[n] = FrozenReplacement(self.rm, self.trace.prefix(n), self.batch)
        return self.models[n]


def _feature_rows(
    rm: ReplacementModel, trace: Trace, prefixes: _Prefixes, sources: SourceVectors,
    idx: torch.Tensor, retain_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge rows ``(features, others)`` (see :meth:`SourceVectors.edges`) for active features
    ``idx`` (indices into ``trace.active``); only layers below the highest target layer, and only
    the prefix of whole position blocks that holds every target, are back-propagated through."""
    d = rm.model.d_model
    targets = trace.active[idx]
    n = prefixes.length(int(targets[:, 1].max()))
    injections: dict[int, torch.Tensor] = {}
    for b, (layer, pos, feature) in enumerate(targets.tolist()):
        if layer not in injections:
            injections[layer] = torch.zeros(len(idx), n, d, device=trace.errors[layer].device)
        injections[layer][b, pos] = rm.transcoders.encoder_vectors(layer, torch.tensor([feature]))[0].float()
    grads, grad_embed = prefixes(n).gradients(injections, None, retain_graph=retain_graph,
                                              n_source_layers=max(injections))
    if n < trace.n_pos:  # later positions get no gradient from these targets
        pad = (0, 0, 0, trace.n_pos - n)
        grads, grad_embed = [torch.nn.functional.pad(g, pad) for g in grads], torch.nn.functional.pad(grad_embed, pad)
    features, others = sources.edges(grads, grad_embed)
    return features.cpu(), others.cpu()  # edge rows are held on the CPU


def attribute(rm: ReplacementModel, prompt: str, config: AttributionConfig = AttributionConfig(),
              progress: Progress | bool = False) -> Graph:
    """Attribution graph of ``prompt`` (unpruned; see :func:`mechscope.graph.prune.prune_graph`).

    Args:
        progress: phase lines and a bar on stderr (:class:`mechscope.progress.Progress`, or a bool).

    Raises:
        BadInputError: empty or over-long prompt, or a target that is not a single token.
    """
    start = time.perf_counter()
    progress = Progress.of(progress)
    # phase 1: trace
    input_ids = rm.tokenize(prompt)
    progress.phase(f"clean run of {len(input_ids)} tokens, encoding {rm.model.n_layers} layers")
    # the unembedding is read in blocks released after use, here and for its mean: the backward
    # passes never read it, and on Gemma 3 270M it is two thirds of the weights
    trace = rm.trace(input_ids, release_vocabulary=True)
    n_active = len(trace.active)
    # phase 2: targets
    targets, vectors = select_logit_targets(
        trace.run.logits, rm.model.W_U, rm.model.tokenizer, config.max_n_logits,
        config.desired_logit_prob, config.targets, rm.model.unembedding_mean(release_vocabulary=True),
        logit_diff=config.logit_diff,
    )
    n_logits = len(targets)
    rm.model.release_vocabulary_weights()  # and the embedding, when it is not tied to the unembedding
    n_pos, n_layers = trace.n_pos, rm.model.n_layers
    n_visit = n_active if config.max_feature_nodes is None else min(config.max_feature_nodes, n_active)
    logger.info("%d tokens, %d active features, visiting %d, %d logit targets", n_pos, n_active, n_visit, n_logits)
    progress.phase(f"{n_active:,} active features; {n_logits} logit targets "
                   f"({', '.join(repr(t.token) for t in targets[:3])}{', ...' if n_logits > 3 else ''}); "
                   f"edges of {n_visit:,} features by influence")
    # phase 3: one frozen forward pass, reused by every backward pass
    batch = max(1, min(config.batch_size, max(n_visit, n_logits)))
    frozen = FrozenReplacement(rm, trace, batch)
    prefixes = _Prefixes(rm, trace, frozen, config.prefix_blocks)
    sources = SourceVectors.build(rm, trace)
    rows = EdgeRows(n_active, (n_layers + 1) * n_pos)
    # phase 4: logit rows
    for i in range(0, n_logits, batch):
        chunk = vectors[i : i + batch]
        inject = torch.zeros(batch, n_pos, rm.model.d_model, device=chunk.device)
        inject[: len(chunk), -1] = chunk
        grads, grad_embed = frozen.gradients({}, inject, retain_graph=True)
        features, others = sources.edges(grads, grad_embed)
        rows.add(torch.full((len(chunk),), -1), features[: len(chunk)].cpu(), others[: len(chunk)].cpu())
    # phase 5: feature rows, visited by influence; each queue is visited whole before the next
    # ranking, so it is sorted by layer: a batch then back-propagates through only the layers
    # below its highest target and stores only the feature columns those layers hold
    visited = torch.zeros(n_active, dtype=torch.bool)
    n_done = 0
    bar = progress.bar(total=n_visit, desc="attribution", unit="feature")
    logit_probs = torch.tensor([t.prob for t in targets])
    while n_done < n_visit:
        if n_visit == n_active:
            pending = torch.arange(n_active)
        else:
            influence = rows.feature_influence(logit_probs)
            rank = torch.argsort(influence, descending=True)
            pending = rank[~visited[rank]][: min(config.update_interval * batch, n_visit - n_done)].sort().values
            del influence, rank
            release_free_memory()  # the influence block and the last queue's gradients
        for idx in pending.split(batch):
            n_done += len(idx)
            features, others = _feature_rows(rm, trace, prefixes, sources, idx, retain_graph=n_done < n_visit)
            rows.add(idx, features, others)
            visited[idx] = True
            bar.update(len(idx))
    bar.close()
    stored_mb = rows.nbytes() / 2**20
    # phase 6: assemble the node set [selected features, errors, tokens, logits]
    progress.phase("assembling the adjacency")
    selected = visited.nonzero().flatten()
    release_free_memory()
    adjacency = rows.assemble(selected, n_logits)
    seconds = time.perf_counter() - start
    logger.info("attribution took %.2fs; edge rows held %.0f MB", seconds, stored_mb)
    return Graph(
        prompt=prompt,
        input_ids=input_ids,
        input_tokens=rm.model.token_strings(input_ids),
        model_id=rm.model.name,
        transcoder_set=rm.transcoders.scan,
        n_layers=n_layers,
        active_features=trace.active.cpu(),
        activation_values=trace.active_values.cpu(),
        selected_features=selected,
        logit_token_ids=torch.tensor([t.token_id for t in targets]),
        logit_tokens=[t.token for t in targets],
        logit_probabilities=logit_probs,
        adjacency=adjacency,
        config={**asdict(config), "targets": list(config.targets),
                "logit_diff": list(config.logit_diff) if config.logit_diff else None, "attribution_seconds": seconds,
                "transcoder_kind": rm.transcoders.kind,
                "first_pos": trace.first_pos, "edge_rows_mb": stored_mb,
                "dtype": str(rm.model.dtype).removeprefix("torch."), "device": str(rm.model.device)},
    )
