"""Logit targets: which outputs an attribution graph explains.

By default the most likely next tokens until their cumulative probability reaches
``desired_logit_prob`` (0.95), at most ``max_n_logits`` (10); or tokens the user names (e.g. the
first token of a refusal, " I"). Each target's input vector is its unembedding row minus the mean
unembedding row ("demeaned"), so its attribution explains the logit relative to the average logit
(Ameisen et al. 2025, section "Attribution graphs"; circuit-tracer ``AttributionTargets``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from jaxtyping import Float

from mechscope.errors import BadInputError

__all__ = ["LogitTarget", "select_logit_targets", "target_token_ids", "unlikely_target_warnings"]

logger = logging.getLogger(__name__)

#: a named target below this probability gets a warning (it explains an output the model does not give)
UNLIKELY = 0.01


@dataclass(frozen=True)
class LogitTarget:
    """One logit node: ``token`` (decoded string), ``token_id``, softmax ``prob`` at the last position."""

    token: str
    token_id: int
    prob: float


def select_logit_targets(
    logits: Float[torch.Tensor, "vocab"],
    W_U: Float[torch.Tensor, "vocab d_model"],
    tokenizer,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    tokens: tuple[str, ...] = (),
    W_U_mean: Float[torch.Tensor, "1 d_model"] | None = None,
    logit_diff: tuple[str, str] | None = None,
) -> tuple[list[LogitTarget], Float[torch.Tensor, "n_targets d_model"]]:
    """Choose logit targets and their demeaned unembedding vectors.

    Args:
        logits: next-token logits at the last prompt position.
        W_U: unembedding ``[vocab, d_model]``.
        tokens: user-named target strings; each must encode to exactly one token.
        W_U_mean: the mean unembedding row in float32, when already computed (see
            ``ModelAdapter.unembedding_mean``); otherwise computed from ``W_U``.
        logit_diff: ``(A, B)``: one target whose vector is ``W_U[A] - W_U[B]`` (the demeaned
            difference: the mean cancels), explaining logit(A) - logit(B). Its ``token`` reads
            ``"A - B"``, its ``token_id`` is A's and its ``prob`` (the weight influence is measured
            by) is 1, as the only target.

    Returns:
        ``(targets, vectors [n_targets, d_model])``.

    Raises:
        BadInputError: a named target that is not a single token.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if logit_diff is not None:
        a, b = (_single_token_id(tokenizer, text) for text in logit_diff)
        vector = (W_U[a].float() - W_U[b].float())[None]
        label = f"{tokenizer.decode([a])} - {tokenizer.decode([b])}"
        return [LogitTarget(label, a, 1.0)], vector
    if tokens:
        ids = target_token_ids(tokenizer, tokens)
        ids_t = torch.tensor(ids)
        for message in unlikely_target_warnings(tokens, ids, probs, tokenizer):
            logger.warning(message)
    else:
        top_p, top_i = probs.topk(min(max_n_logits, probs.shape[-1]))
        cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(desired_logit_prob, device=top_p.device))) + 1
        ids_t = top_i[: min(cutoff, max_n_logits)]
    if W_U_mean is None:
        W_U_mean = W_U.mean(0, keepdim=True, dtype=torch.float32)
    vectors = W_U[ids_t.to(W_U.device)].float() - W_U_mean.to(W_U.device)
    targets = [LogitTarget(tokenizer.decode([int(i)]), int(i), float(probs[i])) for i in ids_t]
    return targets, vectors


def target_token_ids(tokenizer, tokens) -> list[int]:
    """The token id of each named target.

    Raises:
        BadInputError: a target that is not a single token (the message shows its pieces).
    """
    ids = []
    for text in tokens:
        encoded = tokenizer(text, add_special_tokens=False).input_ids
        if len(encoded) != 1:
            pieces = [tokenizer.decode([t]) for t in encoded]
            raise BadInputError(
                f"target {text!r} is not a single token (it encodes to {len(encoded)} tokens: "
                f"{pieces}); name one token, e.g. with its leading space"
            )
        ids.append(encoded[0])
    return ids


def _single_token_id(tokenizer, text: str) -> int:
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    if len(encoded) != 1:
        pieces = [tokenizer.decode([t]) for t in encoded]
        raise BadInputError(f"--logit-diff token {text!r} is not a single token (it encodes to {len(encoded)} tokens: "
                            f"{pieces}); name one token, e.g. with its leading space")
    return encoded[0]


def _variants(text: str) -> list[str]:
    stripped = text.strip()
    return list(dict.fromkeys(v for v in (" " + stripped, stripped, " " + stripped.capitalize(), stripped.capitalize(),
                                          " " + stripped.lower()) if v and v != text))


def unlikely_target_warnings(
    texts: tuple[str, ...], ids: list[int], probs: Float[torch.Tensor, "vocab"], tokenizer
) -> list[str]:
    """Warnings for named targets the model hardly predicts (p < 0.01): the likely intent is a
    variant — most often the leading space (``"basketball"`` vs ``" basketball"``) — when that is one
    token with a higher probability; otherwise the top token is named.

    Args:
        texts, ids: the named targets and their token ids.
        probs: ``[vocab]`` next-token probabilities at the last position.
    """
    messages = []
    for text, token_id in zip(texts, ids):
        p = float(probs[token_id])
        if p >= UNLIKELY:
            continue
        better = []
        for variant in _variants(text):
            encoded = tokenizer(variant, add_special_tokens=False).input_ids
            if len(encoded) == 1 and float(probs[encoded[0]]) > max(10 * p, UNLIKELY):
                better.append((float(probs[encoded[0]]), variant))
        if better:
            q, variant = max(better)
            messages.append(f"target {text!r} has p = {p:.4f} here, but {variant!r} has p = {q:.3f}: "
                            f"did you mean --target {variant!r}?")
        else:
            top = int(probs.argmax())
            messages.append(f"target {text!r} has p = {p:.4f} here: the graph explains an output the model hardly "
                            f"gives (its top token is {tokenizer.decode([top])!r}, p = {float(probs[top]):.3f})")
    return messages
