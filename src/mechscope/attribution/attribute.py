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
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch
from jaxtyping import Int

from mechscope.attribution.edge_rows import ActiveLayout, EdgeRows
from mechscope.attribution.targets import select_logit_targets
from mechscope.progress import Progress
from mechscope.errors import BadInputError
from mechscope.graph.graph import Graph
from mechscope.memory import available_memory_bytes, release_free_memory
from mechscope.replacement.replacement_model import FrozenReplacement, ReplacementModel, Trace

__all__ = ["AttributionConfig", "attribute", "SourceVectors", "plan_groups"]

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
            group of feature targets whose positions all lie in the first ``b`` blocks is
            back-propagated through a frozen replacement model of that prefix only. Attention is
            causal, so the gradients at earlier positions are the same (tested to float rounding)
            and the backward passes of a long prompt cost what their prefixes cost.
        edge_rows_gb: gigabytes the stored edge rows may take in float32; past it they are held in
            float16 (:class:`~mechscope.attribution.edge_rows.EdgeRows`: half the memory, each edge
            rounded to 11 significant bits; the graph's ``config["edge_rows_dtype"]`` says which).
            ``None``: 60 % of the memory available when attribution starts (:func:`~mechscope.memory.available_memory_bytes`), so only a prompt whose
            float32 rows would crowd out the rest of memory is affected.

    Each queue of ``update_interval * batch_size`` features (the unit of circuit-tracer's visiting
    order, kept as it is) is split into groups of at most ``batch_size`` targets that share a tight
    span of layers and positions (:func:`plan_groups`), so a row costs and stores about what its own
    target reaches. The groups change neither which features are visited nor their edges.
    """

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    targets: tuple[str, ...] = ()
    logit_diff: tuple[str, str] | None = None
    batch_size: int = 64
    max_feature_nodes: int | None = 8192
    update_interval: int = 4
    prefix_blocks: int = 8
    edge_rows_gb: float | None = None

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
        if self.edge_rows_gb is not None and not self.edge_rows_gb > 0:
            raise BadInputError(f"edge_rows_gb must be > 0, got {self.edge_rows_gb}")
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
        layout: where each active feature sits (:class:`ActiveLayout`).
        runs: per layer ``(positions, counts)``: the distinct positions of its active features and
            how many sit at each (they are consecutive in the active list).
        decoders: per layer ``[n_unique, n_out, d_model]`` decoder vectors of the distinct features
            active in it (one copy per feature, however many positions it is active at: a long
            prompt's half a million active features have a few thousand distinct decoders).
        rows_of: per layer ``[n_layer]`` each active feature's row in ``decoders``.
        values: per layer ``[n_layer]`` activations (a source's vector is activation x decoder).
        out_layers: per layer, the output layers of its features.
        errors: per layer ``[pos, d_model]`` error vectors (each on its layer's device); embeddings: ``[pos, d_model]``.
    """

    layout: ActiveLayout
    runs: list[tuple[torch.Tensor, list[int]]]
    decoders: list[torch.Tensor]
    rows_of: list[torch.Tensor]
    values: list[torch.Tensor]
    out_layers: list[range]
    errors: list[torch.Tensor]
    embeddings: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, rm: ReplacementModel, trace: Trace) -> SourceVectors:
        layout = ActiveLayout(trace.active[:, 0], trace.active[:, 1], rm.model.n_layers, trace.n_pos)
        runs, decoders, rows_of, values, outs = [], [], [], [], []
        for layer in range(rm.model.n_layers):
            sl = slice(int(layout.starts[layer]), int(layout.starts[layer + 1]))
            rows = trace.active[sl]
            unique, inverse = rows[:, 2].unique(return_inverse=True)
            vectors = rm.transcoders.decoder_vectors(layer, unique).float()  # (n_unique, n_out, d)
            positions, counts = rows[:, 1].unique_consecutive(return_counts=True)
            runs.append((positions, counts.tolist()))
            decoders.append(vectors)
            rows_of.append(inverse.to(vectors.device))
            values.append(trace.active_values[sl].float().to(vectors.device))
            outs.append(rm.transcoders.output_layers(layer))
        return cls(layout, runs, decoders, rows_of, values, outs, list(trace.errors), trace.run.embeddings.float())

    @torch.no_grad()
    def edges(self, grads: list[torch.Tensor], grad_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Direct effects on a batch of targets from source-site gradients of a prefix.

        Args:
            grads: per source layer ``l < n_source_layers`` the ``[batch, n, d_model]`` gradient
                at its MLP output site over the first ``n`` positions (later layers cannot reach
                the targets, nor later positions, which must have none).
            grad_embed: ``[batch, n, d_model]`` gradient at the embedding.

        Returns:
            ``(features [batch, width], others [batch, n_layers + 1, n])``: edges from the active
            features of span ``(n_source_layers, n)`` in :class:`ActiveLayout` order, and from error
            nodes (per layer) and token nodes (last) at positions ``< n``.
        """
        batch, n, _ = grad_embed.shape
        n_source_layers, n_layers = len(grads), len(self.runs)
        offsets = self.layout.offsets(n_source_layers, n).tolist()
        # built transposed, [width, batch]: each position's run of features is a row block that one
        # (n_p, d) x (d, B) product writes in place; a layer's active features are sorted by position
        columns = grad_embed.new_empty(offsets[-1], batch)
        by_position = [g.permute(1, 2, 0) for g in grads]  # [n, d, B] views
        for layer in range(n_source_layers):
            positions, counts = self.runs[layer]
            n_runs = int(torch.searchsorted(positions, n))
            outs = [(o, out) for o, out in enumerate(self.out_layers[layer]) if out < n_source_layers]
            local = 0
            for pos, count in zip(positions[:n_runs].tolist(), counts[:n_runs]):
                block = columns[offsets[layer] + local : offsets[layer] + local + count]
                decoders = self.decoders[layer][self.rows_of[layer][local : local + count]]
                for k, (o, out_layer) in enumerate(outs):
                    source = by_position[out_layer][pos]
                    if source.device == block.device:
                        block.addmm_(decoders[:, o], source) if k else torch.mm(decoders[:, o], source, out=block)
                    else:  # a device map put this layer on another device than the embedding
                        product = (decoders[:, o] @ source).to(block.device)
                        block.add_(product) if k else block.copy_(product)
                if outs:
                    block.mul_(self.values[layer][local : local + count, None].to(block.device))
                else:
                    block.zero_()
                local += count
        features = columns.T
        others = torch.zeros(batch, n_layers + 1, n, device=grad_embed.device)
        for layer, grad in enumerate(grads):
            others[:, layer] = torch.einsum("pd,bpd->bp", self.errors[layer][:n], grad).to(others.device)
        others[:, n_layers] = torch.einsum("pd,bpd->bp", self.embeddings[:n], grad_embed)
        return features, others


class _Prefixes:
    """Frozen replacement models of the prompt's prefixes of whole blocks (``config.prefix_blocks``
    block lengths): the whole prompt's is kept, the others are built on first use (each costs
    about two backward rows) and kept while their lengths sum to at most ``budget`` prompts (the
    least recently used go first)."""

    def __init__(self, rm: ReplacementModel, trace: Trace, full: FrozenReplacement, blocks: int, budget: float = 4.0):
        self.rm, self.trace, self.batch, self.full = rm, trace, full.batch, full
        self.block = -(-trace.n_pos // blocks)
        self.budget = budget * trace.n_pos
        self.models: OrderedDict[int, FrozenReplacement] = OrderedDict()

    def length(self, last_position: int) -> int:
        """The shortest prefix length of whole blocks that holds ``last_position``."""
        return min(self.trace.n_pos, -(-(last_position + 1) // self.block) * self.block)

    def __call__(self, n: int) -> FrozenReplacement:
        if n == self.trace.n_pos:
            return self.full
        if n in self.models:
            self.models.move_to_end(n)
        else:
            while self.models and sum(self.models) + n > self.budget:
                self.models.popitem(last=False)
            self.models[n] = FrozenReplacement(self.rm, self.trace.prefix(n), self.batch)
        return self.models[n]


# Cost of back-propagating a group, in units of one target through one layer at one position
# (measured on Gemma 3 270M: 15-20 us a unit; a call costs about 48 units a layer in overhead, the
# edge products about 0.7 of a target; every ranking by influence visits every stored chunk, about
# 300 us, 20 units, each time).
_CALL_UNITS, _EDGE_ROWS, _RANKING_UNITS = 48.0, 0.7, 20.0


def plan_groups(layers: Int[torch.Tensor, "m"], positions: Int[torch.Tensor, "m"], prefix_length,
                max_group: int, group_units: float = 0.0) -> list[torch.Tensor]:
    """Split a queue of feature targets into groups for batched backward passes.

    A group of targets is back-propagated through the layers below its highest target layer ``L``
    and the prefix of ``prefix_length(max position)`` positions, and its rows store that span's
    columns, so its cost is about ``(L + 1) * ((size + 0.7) * n + 48) + group_units`` (per-call
    overhead included; ``group_units`` is what a stored chunk costs later, in the rankings). The
    targets are taken in (layer, position) order and cut into consecutive groups of at most
    ``max_group`` by dynamic programming on that cost (exact for the order, O(m * max_group)).

    Args:
        layers, positions: ``[m]`` of the queue's targets, sorted by (layer, position).
        prefix_length: position -> prefix length of the backward pass.
        max_group: at most this many targets in a group (>= 1).

    Returns:
        index tensors into the queue, each a group, in queue order.
    """
    m = len(layers)
    lay, pos = layers.tolist(), positions.tolist()
    best = np.full(m + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(m + 1, dtype=np.int64)
    for j in range(1, m + 1):
        top_layer = top_pos = 0
        for i in range(j - 1, max(j - max_group, 0) - 1, -1):
            top_layer, top_pos = max(top_layer, lay[i]), max(top_pos, pos[i])
            cost = best[i] + (top_layer + 1) * ((j - i + _EDGE_ROWS) * prefix_length(top_pos) + _CALL_UNITS) + group_units
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], m
    while j:
        groups.append(torch.arange(int(cut[j]), j))
        j = int(cut[j])
    return groups[::-1]


def _feature_rows(
    rm: ReplacementModel, trace: Trace, prefixes: _Prefixes, sources: SourceVectors, idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Edge rows ``(features, others, span)`` (see :meth:`SourceVectors.edges`) for active features
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
    n_source_layers = max(injections)
    grads, grad_embed = prefixes(n).gradients(injections, None, retain_graph=True, n_source_layers=n_source_layers)
    features, others = sources.edges(grads, grad_embed)
    return features.cpu(), others.cpu(), (n_source_layers, n)  # edge rows are held on the CPU


def attribute(rm: ReplacementModel, prompt: str, config: AttributionConfig = AttributionConfig(),
              progress: Progress | bool = False, release_tokenizer: bool = False) -> Graph:
    """Attribution graph of ``prompt`` (unpruned; see :func:`mechscope.graph.prune.prune_graph`).

    Args:
        progress: phase lines and a bar on stderr (:class:`mechscope.progress.Progress`, or a bool).
        release_tokenizer: drop the model's tokenizer once the targets and token strings are decoded
            (:meth:`~mechscope.models.adapter.ModelAdapter.release_tokenizer`; it is loaded again if
            used): for a command that traces one prompt, it lowers the peak by the tokenizer's size.

    Raises:
        BadInputError: empty or over-long prompt, or a target that is not a single token.
    """
    start = time.perf_counter()
    progress = Progress.of(progress)
    # phase 1: trace
    input_ids = rm.tokenize(prompt)
    progress.phase(f"clean run of {len(input_ids)} tokens, encoding {rm.model.n_layers} layers")
    # the unembedding is read in blocks released after use, here and for its mean, and each MLP's
    # weights are released once it has run: the backward passes read neither (the transcoders take
    # the MLPs' place), and on Gemma 3 270M they are 93 % of the float32 weights
    trace = rm.trace(input_ids, release_vocabulary=True, release_mlps=True)
    n_active = len(trace.active)
    # phase 2: targets
    targets, vectors = select_logit_targets(
        trace.run.logits, rm.model.W_U, rm.model.tokenizer, config.max_n_logits,
        config.desired_logit_prob, config.targets, rm.model.unembedding_mean(release_vocabulary=True),
        logit_diff=config.logit_diff,
    )
    n_logits = len(targets)
    input_tokens = rm.model.token_strings(input_ids)
    if release_tokenizer:
        rm.model.release_tokenizer()
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
    budget = 0.6 * available_memory_bytes() if config.edge_rows_gb is None else config.edge_rows_gb * 1e9
    rows = EdgeRows(sources.layout, budget)
    # phase 4: logit rows
    for i in range(0, n_logits, batch):
        chunk = vectors[i : i + batch]
        inject = torch.zeros(batch, n_pos, rm.model.d_model, device=chunk.device)
        inject[: len(chunk), -1] = chunk
        grads, grad_embed = frozen.gradients({}, inject, retain_graph=True)
        features, others = sources.edges(grads, grad_embed)
        rows.add(torch.full((len(chunk),), -1), features[: len(chunk)].cpu(), others[: len(chunk)].cpu())
    del grads, grad_embed
    # phase 5: feature rows, visited by influence; each queue is visited whole before the next
    # ranking, so it is cut into groups with a tight span of layers and positions (plan_groups),
    # taken in order of their prefix length so that prefix models are reused
    visited = torch.zeros(n_active, dtype=torch.bool)
    n_done = 0
    n_rankings = 0 if n_visit == n_active else -(-n_visit // (config.update_interval * batch))
    chunk_units = _RANKING_UNITS * n_rankings / 2  # a chunk is ranked in half the rankings, on average
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
        groups = []
        for part in pending.split(256):  # the planner is quadratic in the part's length
            where = trace.active[part]
            groups += [part[g] for g in plan_groups(where[:, 0], where[:, 1], prefixes.length, batch, chunk_units)]
        groups.sort(key=lambda g, length=prefixes.length: length(int(trace.active[g, 1].max())))
        for idx in groups:
            n_done += len(idx)
            features, others, span = _feature_rows(rm, trace, prefixes, sources, idx)
            rows.add(idx, features, others, span)
            visited[idx] = True
            bar.update(len(idx))
    bar.close()
    stored_mb = rows.nbytes() / 2**20
    rows_dtype = "float16" if rows.compact else "float32"
    # phase 6: assemble the node set [selected features, errors, tokens, logits]; the backward
    # passes are done, so the frozen models and source vectors go, and the kernel may reclaim the
    # weights' pages (values kept: read back from the file if the model runs again) rather than
    # hold them under the adjacency
    progress.phase("assembling the adjacency")
    selected = visited.nonzero().flatten()
    del frozen, prefixes, sources
    rm.model.release_weights()
    release_free_memory()
    adjacency = rows.assemble(selected, n_logits)
    seconds = time.perf_counter() - start
    logger.info("attribution took %.2fs; edge rows held %.0f MB", seconds, stored_mb)
    return Graph(
        prompt=prompt,
        input_ids=input_ids,
        input_tokens=input_tokens,
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
                "first_pos": trace.first_pos, "edge_rows_mb": stored_mb, "edge_rows_dtype": rows_dtype,
                "dtype": str(rm.model.dtype).removeprefix("torch."), "device": str(rm.model.device)},
    )
