"""Logit targets: which outputs an attribution graph explains.

By default the most likely next tokens until their cumulative probability reaches
``desired_logit_prob`` (0.95), at most ``max_n_logits`` (10); or tokens the user names (e.g. the
first token of a refusal, " I"). Each target's input vector is its unembedding row minus the mean
unembedding row ("demeaned"), so its attribution explains the logit relative to the average logit
(Ameisen et al. 2025, section "Attribution graphs"; circuit-tracer ``AttributionTargets``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from mechscope.errors import BadInputError

__all__ = ["LogitTarget", "select_logit_targets"]


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
) -> tuple[list[LogitTarget], Float[torch.Tensor, "n_targets d_model"]]:
    """Choose logit targets and their demeaned unembedding vectors.

    Args:
        logits: next-token logits at the last prompt position.
        W_U: unembedding ``[vocab, d_model]``.
        tokens: user-named target strings; each must encode to exactly one token.
        W_U_mean: the mean unembedding row in float32, when already computed (see
            ``ModelAdapter.unembedding_mean``); otherwise computed from ``W_U``.

    Returns:
        ``(targets, vectors [n_targets, d_model])``.

    Raises:
        BadInputError: a named target that is not a single token.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if tokens:
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
        ids_t = torch.tensor(ids)
    else:
        top_p, top_i = probs.topk(min(max_n_logits, probs.shape[-1]))
        cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(desired_logit_prob))) + 1
        ids_t = top_i[: min(cutoff, max_n_logits)]
    if W_U_mean is None:
        W_U_mean = W_U.mean(0, keepdim=True, dtype=torch.float32)
    vectors = W_U[ids_t].float() - W_U_mean
    targets = [LogitTarget(tokenizer.decode([int(i)]), int(i), float(probs[i])) for i in ids_t]
    return targets, vectors
