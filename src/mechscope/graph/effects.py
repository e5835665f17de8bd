"""Signed effects of every node on the logit targets: direct (one edge) and total (every path).

Influence (:mod:`mechscope.graph.prune`) ranks nodes by the *unsigned*, row-normalised weight of
their paths to the logits: a node that pushes the answer down is as influential as one that pushes
it up. The signed effects say which way:

- **direct effect** of source ``s`` on logit target ``t``: the edge ``A[t, s]``, in demeaned-logit
  units (the logit minus the mean logit, the quantity a logit node explains).
- **total effect**: the sum over every path ``s -> f_1 -> ... -> f_k -> t`` of the path's edge
  product, each intermediate feature's edges divided by its activation (an edge ``A[t, f]`` is
  the effect of ``f``'s whole activation ``a_f``; ``A[f, s]`` moves ``f``'s pre-activation, and so its
  activation, by that much):

      total[t, s] = A[t, s] + sum_f A[t, f] / a_f * A[f, s] + ...  =  (A D^-1 + (A D^-1)^2 + ...)[t, s] a_s

  with ``D = diag(a)`` (``a = 1`` for error and token nodes, whose edges are the effect of the whole
  vector). It is the first-order change of the target when ``s`` is removed from the local
  replacement model with attention patterns and norm scales frozen and every downstream feature
  free to respond (a JumpReLU is linear above its threshold) — what "zeroing this feature" predicts
  before any feature crosses its threshold.

A node with a large influence and a negative total effect works against the target (the README
example: feature 16/759 of the Michael Jordan graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from mechscope.graph.graph import Graph

__all__ = ["SignedEffects", "node_scales", "signed_effects"]


@dataclass(frozen=True)
class SignedEffects:
    """Per node, the signed effect on each logit target.

    Attributes:
        direct: ``[n_nodes, n_logits]`` the edges into each logit node.
        total: ``[n_nodes, n_logits]`` the sum over all paths (see the module docstring).
        Both in demeaned-logit units; rows of logit nodes are zero.
    """

    direct: Float[torch.Tensor, "n_nodes n_logits"]
    total: Float[torch.Tensor, "n_nodes n_logits"]


def node_scales(graph: Graph) -> Float[torch.Tensor, "n_nodes"]:
    """``a``: each feature node's activation; 1 for error, token and logit nodes."""
    scales = torch.ones(graph.n_nodes)
    scales[: graph.n_features] = graph.activation_values[graph.selected_features].float()
    return scales


def signed_effects(graph: Graph) -> SignedEffects:
    """Direct and total signed effects of every node on every logit target.

    Iterates ``x <- (x / a) A`` from the logit rows of ``A``; the graph is acyclic (edges only reach
    later layers), so it ends after at most ``n_layers + 2`` products of ``[n_logits, n_nodes]`` by
    ``[n_nodes, n_nodes]``.

    Raises:
        RuntimeError: the series does not end (the adjacency has a cycle).
    """
    A = graph.adjacency.float()
    scales = node_scales(graph)
    logits = slice(graph.logit_offset, graph.n_nodes)
    direct = A[logits].clone()  # [n_logits, n_nodes]
    total, current = direct.clone(), direct
    for _ in range(graph.n_layers + 3):
        current = (current / scales) @ A
        if not current.any():
            return SignedEffects(direct.T.contiguous(), total.T.contiguous())
        total += current
    raise RuntimeError("signed effects did not converge; does the adjacency have a cycle?")
