"""The attribution graph: node table and adjacency (row = target, column = source).

Node order, as in circuit-tracer: ``[selected features, error nodes (layer-major: layer * n_pos +
pos), token (embedding) nodes (pos), logit nodes]``. ``adjacency[t, s]`` is the direct effect of
source ``s`` on target ``t`` in the local replacement model: for a feature target its
pre-activation, for a logit target its demeaned logit. Token and error nodes have no incoming edges.

This module imports only torch and the standard library, so a saved graph loads without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float, Int

__all__ = ["Graph", "NodeKind", "FeatureNode"]


class NodeKind:
    FEATURE = "feature"
    ERROR = "error"
    TOKEN = "token"
    LOGIT = "logit"


class FeatureNode(NamedTuple):
    """A feature node: ``layer``, token position ``pos``, transcoder ``feature`` index and its
    ``activation``. Unpacks as ``layer, pos, feature, activation``; :attr:`node_id` (``16_759_8``)
    and :attr:`ref` (``16/759@8``) are the forms every command accepts (:mod:`mechscope.node_ids`)."""

    layer: int
    pos: int
    feature: int
    activation: float

    @property
    def node_id(self) -> str:
        return f"{self.layer}_{self.feature}_{self.pos}"

    @property
    def ref(self) -> str:
        return f"{self.layer}/{self.feature}@{self.pos}"


@dataclass(repr=False)
class Graph:
    """An attribution graph of one prompt.

    Attributes:
        prompt: the traced text; ``input_ids [n_pos]`` and ``input_tokens`` its tokens.
        model_id, transcoder_set: what was traced.
        n_layers: the model's layer count.
        active_features: ``[n_active, 3]`` (layer, pos, feature index) of every active feature.
        activation_values: ``[n_active]`` their activations.
        selected_features: ``[n_selected]`` indices into ``active_features`` of the feature nodes.
        logit_token_ids, logit_tokens, logit_probabilities: the ``n_logits`` logit targets.
        adjacency: ``[n_nodes, n_nodes]`` float32 edge weights (target row, source column).
        config: attribution settings used (JSON-serialisable).
    """

    prompt: str
    input_ids: Int[torch.Tensor, "n_pos"]
    input_tokens: list[str]
    model_id: str
    transcoder_set: str
    n_layers: int
    active_features: Int[torch.Tensor, "n_active 3"]
    activation_values: Float[torch.Tensor, "n_active"]
    selected_features: Int[torch.Tensor, "n_selected"]
    logit_token_ids: Int[torch.Tensor, "n_logits"]
    logit_tokens: list[str]
    logit_probabilities: Float[torch.Tensor, "n_logits"]
    adjacency: Float[torch.Tensor, "n_nodes n_nodes"]
    config: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        prompt = self.prompt if len(self.prompt) <= 60 else self.prompt[:57] + "..."
        targets = ", ".join(f"{t!r} {float(p):.3f}" for t, p in zip(self.logit_tokens[:3], self.logit_probabilities[:3]))
        more = ", ..." if self.n_logits > 3 else ""
        return (f"Graph({prompt!r}, model={self.model_id!r}, transcoders={self.transcoder_set!r}, n_pos={self.n_pos}, "
                f"features={self.n_features} of {len(self.active_features)} active, errors={self.n_errors}, "
                f"logits=[{targets}{more}], nodes={self.n_nodes})")

    # ----------------------------------------------------------------- sizes and offsets
    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_token_ids)

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    @property
    def error_offset(self) -> int:
        return self.n_features

    @property
    def token_offset(self) -> int:
        return self.n_features + self.n_errors

    @property
    def logit_offset(self) -> int:
        return self.token_offset + self.n_pos

    def logit_weights(self) -> Float[torch.Tensor, "n_nodes"]:
        """Probability of each logit node, zero elsewhere (the weights influence is measured by)."""
        w = torch.zeros(self.n_nodes)
        w[self.logit_offset :] = self.logit_probabilities.float()
        return w

    # ----------------------------------------------------------------- node table
    def node_kind(self, node: int) -> str:
        if node < self.error_offset:
            return NodeKind.FEATURE
        if node < self.token_offset:
            return NodeKind.ERROR
        if node < self.logit_offset:
            return NodeKind.TOKEN
        return NodeKind.LOGIT

    def feature_of(self, node: int) -> FeatureNode:
        """The :class:`FeatureNode` ``(layer, pos, feature, activation)`` of feature node ``node``."""
        i = int(self.selected_features[node])
        layer, pos, feature = (int(v) for v in self.active_features[i])
        return FeatureNode(layer, pos, feature, float(self.activation_values[i]))

    def error_of(self, node: int) -> tuple[int, int]:
        """``(layer, pos)`` of error node ``node``."""
        return divmod(node - self.error_offset, self.n_pos)

    def node_id(self, node: int) -> str:
        """Neuronpedia node id: feature ``{layer}_{feature}_{pos}``, error ``{layer}_-1_{pos}``,
        embedding ``E_{token_id}_{pos}``, logit ``{n_layers + 1}_{token_id}_{pos}`` (DESIGN.md)."""
        kind = self.node_kind(node)
        if kind == NodeKind.FEATURE:
            layer, pos, feature, _ = self.feature_of(node)
            return f"{layer}_{feature}_{pos}"
        if kind == NodeKind.ERROR:
            layer, pos = self.error_of(node)
            return f"{layer}_-1_{pos}"
        if kind == NodeKind.TOKEN:
            pos = node - self.token_offset
            return f"E_{int(self.input_ids[pos])}_{pos}"
        k = node - self.logit_offset
        return f"{self.n_layers + 1}_{int(self.logit_token_ids[k])}_{self.n_pos - 1}"

    def node_index(self) -> dict[str, int]:
        """Map from node id to node number."""
        return {self.node_id(i): i for i in range(self.n_nodes)}
