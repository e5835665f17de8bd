"""Fluent dreaming: prompts that drive one feature while staying fluent (EPO).

Evolutionary Prompt Optimization (Thompson, Rivière et al. 2024, "Fluent dreaming for language
models", arXiv 2402.01702; reference code ``Confirm-Solutions/dreamy``), as Anthropic's circuits
updates use "dreaming" to find what drives a feature beyond its dashboard. In paper order:

1. **Objective.** Member ``i`` of a population carries a fluency penalty ``lambda_i`` (default:
   ``population`` values log-spaced from 0.1 to 10) and maximises
   ``activation - lambda_i * xent``: ``activation`` is the feature's transcoder activation at the
   prompt's last token (transcoder units, read from the MLP input of ``layer``) and ``xent`` the
   model's own mean next-token cross-entropy over the prompt (nats per token, every token after
   the first predicted). A JumpReLU activation is 0, with zero gradient, wherever the feature does
   not fire, so the search uses the *pre-activation* in its place: equal to the activation whenever
   the feature fires, and still a slope towards firing when it does not. Reported activations and
   the Pareto frontier use the real activation.
2. **Token scores.** One forward and backward pass of every member gives the gradient of its
   objective at the embedding output; dotting it with every token's embedding vector (as the
   embedding module outputs it, scale included: Gemma multiplies by ``sqrt(d_model)``) scores
   each one-token swap to first order (GCG, Zou et al. 2023).
3. **Mutation.** Each member has ``children_per_member`` children, each with one token replaced:
   a uniformly random position (never the BOS at position 0) and a token drawn uniformly from the
   ``top_k`` best-scored tokens there. Special tokens are never proposed.
4. **Selection.** For every penalty, the new member is the best of all parents and children under
   that penalty's objective (ties keep the parent).
5. **Restart.** As in EPO's reference code, after selection on iterations ``0, restart_every,
   2 * restart_every, ...`` every member restarts from one candidate: the best of that iteration's
   parents and children under a penalty drawn uniformly from ``[2/3, 6]`` (``restart_penalty``
   2.0 divided or multiplied by up to 3), i.e. a random point of the current Pareto frontier.
   The reference code draws that penalty but then uses the fixed 2.0; here the drawn one is used.

Every evaluated prompt joins a Pareto frontier over (activation up, xent down), returned
highest activation first.

Example (tiny random model, runs offline)::

    result = dream_feature(rm, layer=1, feature=3, n_iters=20, seq_len=8)
    print(result.start_activation, result.frontier[0].activation, result.frontier[0].text)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from mechscope.errors import BadInputError
from mechscope.replacement.replacement_model import ReplacementModel

__all__ = ["DreamConfig", "DreamPrompt", "DreamResult", "dream_feature", "embedding_scale"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DreamConfig:
    """Settings of one dreaming run (defaults as in EPO, except fewer children and candidates).

    Attributes:
        n_iters: EPO iterations (>= 1).
        seq_len: prompt length in tokens, BOS included (>= 2); a ``start`` prompt sets its own.
        population: members, one per fluency penalty (>= 1), used when ``penalties`` is ``None``.
        penalties: fluency penalty per member (>= 0, nats of xent per unit of activation);
            ``None``: ``population`` values log-spaced from 0.1 to 10.
        top_k: candidate tokens per position, by gradient score (>= 1).
        children_per_member: one-token mutations per member per iteration (>= 1).
        restart_every: iterations between restarts (>= 1).
        restart_penalty: centre of the restart penalty range ``[p / 3, 3 p]`` (> 0).
        batch_size: prompts per no-grad forward pass (>= 1).
        seed: seed of every random draw (initial tokens, mutations, restarts).
    """

    n_iters: int = 300
    seq_len: int = 12
    population: int = 8
    penalties: tuple[float, ...] | None = None
    top_k: int = 32
    children_per_member: int = 8
    restart_every: int = 50
    restart_penalty: float = 2.0
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        for name, low in (("n_iters", 1), ("seq_len", 2), ("population", 1), ("top_k", 1),
                          ("children_per_member", 1), ("restart_every", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise BadInputError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.penalties is not None:
            penalties = tuple(self.penalties)
            if not penalties or any(not (p >= 0 and p < float("inf")) for p in penalties):
                raise BadInputError(f"penalties must be a non-empty list of finite numbers >= 0, got {penalties}")
            object.__setattr__(self, "penalties", tuple(float(p) for p in penalties))
        if not self.restart_penalty > 0:
            raise BadInputError(f"restart_penalty must be > 0, got {self.restart_penalty}")

    @property
    def lambdas(self) -> Float[torch.Tensor, "member"]:
        """The fluency penalty of every member."""
        if self.penalties is not None:
            return torch.tensor(self.penalties)
        return torch.logspace(-1, 1, self.population, dtype=torch.float64).float()


@dataclass(frozen=True)
class DreamPrompt:
    """One evaluated prompt.

    Attributes:
        token_ids, tokens: the prompt's tokens (BOS included) and their strings.
        text: the decoded prompt after BOS.
        activation: the feature's activation at the last token (transcoder units).
        xent: the model's mean next-token cross-entropy over the prompt (nats per token).
    """

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    text: str
    activation: float
    xent: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DreamResult:
    """What one run found.

    Attributes:
        layer, feature: the feature dreamt about.
        penalties: the fluency penalty of every member.
        starts: the initial prompt of every member.
        frontier: Pareto-optimal prompts of every evaluated one (no other has both a higher
            activation and a lower xent), highest activation first; so xent falls down the list.
        history: per iteration, the highest activation evaluated so far.
    """

    layer: int
    feature: int
    penalties: list[float]
    starts: list[DreamPrompt]
    frontier: list[DreamPrompt]
    history: list[float]

    @property
    def start_activation(self) -> float:
        """The highest activation among the initial prompts."""
        return max(p.activation for p in self.starts)


@dataclass
class _Scored:
    """Prompts ``ids [n, pos]`` with ``pre``, ``activation`` and ``xent``, each ``[n]``."""

    ids: Int[torch.Tensor, "n pos"]
    pre: Float[torch.Tensor, "n"]
    activation: Float[torch.Tensor, "n"]
    xent: Float[torch.Tensor, "n"]

    def objectives(self, lambdas: Float[torch.Tensor, "member"]) -> Float[torch.Tensor, "member n"]:
        return self.pre[None] - lambdas[:, None].to(self.xent) * self.xent[None]

    def cat(self, other: _Scored) -> _Scored:
        return _Scored(*(torch.cat([a, b]) for a, b in zip(self.astuple(), other.astuple())))

    def take(self, index: Int[torch.Tensor, "k"]) -> _Scored:
        return _Scored(*(t[index] for t in self.astuple()))

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return self.ids, self.pre, self.activation, self.xent

    def points(self) -> dict[tuple[int, ...], tuple[float, float]]:
        """``token ids -> (activation, xent)`` of every prompt."""
        return dict(zip(map(tuple, self.ids.tolist()), zip(self.activation.tolist(), self.xent.tolist())))


def embedding_scale(rm: ReplacementModel) -> float:
    """The factor the input embedding module applies to its weight rows, measured on one token
    (``sqrt(d_model)`` for Gemma, whose module multiplies by ``embed_scale``; 1 for most models)."""
    embed = rm.model.hf.get_input_embeddings()
    token = embed.weight.detach().float().norm(dim=1).argmax()
    row = embed.weight[token].float()
    with torch.no_grad():
        out = embed(token[None])[0].float()
    return float(out @ row / (row @ row))


# ------------------------------------------------------------------------------------ phases
def _forward(rm: ReplacementModel, layer: int, feature: int, ids: Int[torch.Tensor, "n pos"],
             embeds: Float[torch.Tensor, "n pos d_model"] | None = None) -> _Scored:
    """One full forward pass: the feature at the last token and the prompt's self cross-entropy."""
    captured: dict[str, torch.Tensor] = {}
    hook = rm.model.mlp(layer).register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    try:
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        hidden = rm.model.body(**inputs, use_cache=False).last_hidden_state  # (n, pos, d_model)
    finally:
        hook.remove()
    x = captured["x"][:, -1].float()  # (n, d_model), the MLP input at the last token
    pre = rm.transcoders.pre_activations(layer, x)[:, feature]  # (n,)
    activation = rm.transcoders.encode(layer, x.detach())[:, feature]  # (n,)
    # contiguous: on CPU the W_U matmul of a strided slice is ~7x slower (7 s against 1 s at n = 64)
    final = hidden[:, :-1].contiguous()  # (n, pos - 1, d_model)
    logits = rm.model.output_logits(final).float().flatten(0, 1)  # (n * (pos - 1), vocab)
    xent = F.cross_entropy(logits, ids[:, 1:].flatten(), reduction="none").view(len(ids), -1).mean(1)  # (n,)
    return _Scored(ids, pre, activation, xent)


@torch.no_grad()
def _evaluate(rm: ReplacementModel, layer: int, feature: int, ids: Int[torch.Tensor, "n pos"],
              batch_size: int) -> _Scored:
    """:func:`_forward` in batches of ``batch_size`` prompts, without gradients."""
    parts = [_forward(rm, layer, feature, chunk) for chunk in ids.split(batch_size)]
    return _Scored(*(torch.cat(ts) for ts in zip(*(p.astuple() for p in parts))))


def _token_scores(rm: ReplacementModel, layer: int, feature: int, members: Int[torch.Tensor, "member pos"],
                  lambdas: Float[torch.Tensor, "member"], scale: float) -> Float[torch.Tensor, "member pos vocab"]:
    """First-order change of each member's objective when the token at ``pos`` becomes ``vocab``
    (up to a per-position constant): ``grad_e objective . (scale * W_E[vocab])``."""
    embed = rm.model.hf.get_input_embeddings()
    embeds = embed(members).detach().requires_grad_(True)  # (member, pos, d_model), scale applied
    with torch.enable_grad():
        scored = _forward(rm, layer, feature, members, embeds)
        (scored.pre - lambdas.to(scored.xent) * scored.xent).sum().backward()
    W_E = embed.weight.detach()  # (vocab, d_model), rows before the module's scale
    return (embeds.grad.to(W_E.dtype) @ W_E.T).float() * scale


def _mutate(members: Int[torch.Tensor, "member pos"], scores: Float[torch.Tensor, "member pos vocab"],
            allowed: Bool[torch.Tensor, "vocab"], fixed: int, config: DreamConfig,
            gen: torch.Generator) -> Int[torch.Tensor, "child pos"]:
    """``children_per_member`` one-token mutations of every member, from its top-``k`` tokens."""
    scores = scores[:, fixed:].masked_fill(~allowed.to(scores.device), -torch.inf)
    k = min(config.top_k, int(allowed.sum()))
    candidates = scores.topk(k, dim=-1).indices.cpu()  # (member, pos - fixed, k)
    parent = torch.arange(len(members)).repeat_interleave(config.children_per_member)  # (child,)
    position = torch.randint(members.shape[1] - fixed, (len(parent),), generator=gen)
    choice = torch.randint(k, (len(parent),), generator=gen)
    children = members.cpu()[parent].clone()
    children[torch.arange(len(parent)), position + fixed] = candidates[parent, position, choice]
    return children.to(members.device)


def _restart_index(candidates: _Scored, config: DreamConfig, gen: torch.Generator) -> int:
    """EPO's restart: the best candidate under a penalty drawn uniformly from ``[p / 3, 3 p]``."""
    low, high = config.restart_penalty / 3, config.restart_penalty * 3
    penalty = low + (high - low) * float(torch.rand((), generator=gen))
    index = int(candidates.objectives(torch.tensor([penalty]))[0].argmax())
    logger.info("restart from the best prompt under penalty %.2f (activation %.3f, xent %.2f)", penalty,
                float(candidates.activation[index]), float(candidates.xent[index]))
    return index


def _pareto(points: dict[tuple[int, ...], tuple[float, float]]) -> dict[tuple[int, ...], tuple[float, float]]:
    """The points ``ids -> (activation, xent)`` that no other beats (activation up, xent down),
    highest activation first."""
    frontier, best_xent = {}, float("inf")
    for key in sorted(points, key=lambda k: (-points[k][0], points[k][1])):
        if points[key][1] < best_xent:
            frontier[key] = points[key]
            best_xent = points[key][1]
    return frontier


def _allowed_tokens(rm: ReplacementModel, vocab: int) -> Bool[torch.Tensor, "vocab"]:
    """Tokens a mutation may propose: the tokenizer's ordinary tokens (no special or padding ids)."""
    tokenizer = rm.model.tokenizer
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[: min(vocab, len(tokenizer))] = True
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    allowed[[i for i in special if 0 <= i < vocab]] = False
    return allowed


def _initial_ids(rm: ReplacementModel, start: str | Sequence[int] | torch.Tensor | None, n_members: int,
                 allowed: Bool[torch.Tensor, "vocab"], config: DreamConfig,
                 gen: torch.Generator) -> Int[torch.Tensor, "member pos"]:
    """Every member's first prompt: ``start`` for all, or (as in EPO) independent random tokens."""
    if isinstance(start, str):
        return rm.tokenize(start)[None].repeat(n_members, 1)
    if start is not None:
        ids = torch.as_tensor(start, dtype=torch.long).flatten()
        if len(ids) < 2 or ids.min() < 0 or ids.max() >= len(allowed):
            raise BadInputError(f"start token ids must be at least 2 ids in 0..{len(allowed) - 1}, got {ids.tolist()}")
        return ids[None].repeat(n_members, 1)
    bos = rm.model.tokenizer.bos_token_id
    has_bos = rm.model.has_bos(rm.model.tokenize("a"))
    pool = allowed.nonzero()[:, 0]
    n_random = config.seq_len - (1 if has_bos else 0)
    ids = pool[torch.randint(len(pool), (n_members, n_random), generator=gen)]  # (member, pos)
    return torch.cat([torch.full((n_members, 1), bos), ids], dim=1) if has_bos else ids


def _prompt(rm: ReplacementModel, ids: tuple[int, ...], activation: float, xent: float, fixed: int) -> DreamPrompt:
    decode = rm.model.tokenizer.decode
    return DreamPrompt(ids, tuple(decode([t]) for t in ids), decode(list(ids[fixed:])), activation, xent)


def _check_feature(rm: ReplacementModel, layer: int, feature: int) -> None:
    if not 0 <= layer < rm.model.n_layers:
        raise BadInputError(f"layer {layer} is out of range 0..{rm.model.n_layers - 1}")
    if not 0 <= feature < rm.transcoders.d_transcoder(layer):
        raise BadInputError(f"feature {feature} is out of range 0..{rm.transcoders.d_transcoder(layer) - 1} "
                            f"(layer {layer})")


# ------------------------------------------------------------------------------------ the loop
def dream_feature(
    rm: ReplacementModel,
    layer: int,
    feature: int,
    *,
    n_iters: int = DreamConfig.n_iters,
    seq_len: int = DreamConfig.seq_len,
    population: int = DreamConfig.population,
    penalties: Sequence[float] | None = None,
    top_k: int = DreamConfig.top_k,
    children_per_member: int = DreamConfig.children_per_member,
    restart_every: int = DreamConfig.restart_every,
    seed: int = DreamConfig.seed,
    start: str | Sequence[int] | torch.Tensor | None = None,
    progress: bool = False,
    config: DreamConfig | None = None,
) -> DreamResult:
    """Optimise prompts that activate feature ``layer/feature`` while staying fluent (EPO).

    Args:
        rm: the model and its transcoders.
        layer, feature: the feature (its transcoder reads the MLP input of ``layer``).
        n_iters, seq_len, population, penalties, top_k, children_per_member, restart_every, seed:
            see :class:`DreamConfig` (ignored when ``config`` is given).
        start: initial prompt of every member, as text (tokenised with BOS) or token ids
            ``[pos]``; its length replaces ``seq_len``. Default: random ordinary tokens per member.
        progress: show a progress bar.

    Returns:
        a :class:`DreamResult`; the same ``seed`` gives the same result on the same device.

    Raises:
        BadInputError: layer or feature out of range (names the range), ``n_iters`` < 1,
            ``seq_len`` < 2, other settings out of range, negative penalties, an empty start
            prompt or one with no token after BOS.
    """
    config = config or DreamConfig(n_iters=n_iters, seq_len=seq_len, population=population,
                                   penalties=None if penalties is None else tuple(penalties), top_k=top_k,
                                   children_per_member=children_per_member, restart_every=restart_every, seed=seed)
    _check_feature(rm, layer, feature)
    gen = torch.Generator().manual_seed(config.seed)
    lambdas = config.lambdas
    W_E = rm.model.hf.get_input_embeddings().weight
    allowed = _allowed_tokens(rm, W_E.shape[0])
    members = _initial_ids(rm, start, len(lambdas), allowed, config, gen).to(W_E.device)
    fixed = 1 if rm.model.has_bos(members[0]) else 0
    if members.shape[1] - fixed < 1:
        raise BadInputError("the start prompt needs at least one token after BOS")
    scale = embedding_scale(rm)

    state = _evaluate(rm, layer, feature, members, config.batch_size)
    starts = [_prompt(rm, tuple(ids), a, x, fixed)
              for ids, a, x in zip(state.ids.tolist(), state.activation.tolist(), state.xent.tolist())]
    frontier = _pareto(state.points())
    best, history = float(state.activation.max()), []
    for iteration in tqdm(range(config.n_iters), disable=not progress, desc=f"dream {layer}/{feature}"):
        scores = _token_scores(rm, layer, feature, state.ids, lambdas, scale)
        children = _evaluate(rm, layer, feature, _mutate(state.ids, scores, allowed, fixed, config, gen),
                             config.batch_size)
        candidates = state.cat(children)
        keep = candidates.objectives(lambdas).argmax(dim=1)  # (member,), parents first: ties keep them
        if iteration % config.restart_every == 0:
            keep[:] = _restart_index(candidates, config, gen)
        state = candidates.take(keep)
        frontier = _pareto(frontier | children.points())
        best = max(best, float(children.activation.max()))
        history.append(best)
    return DreamResult(layer, feature, lambdas.tolist(), starts,
                       [_prompt(rm, ids, a, x, fixed) for ids, (a, x) in frontier.items()], history)
