"""Export attribution graphs to Neuronpedia's graph JSON (also read by circuit-tracer's UI).

Structure: ``metadata`` (``slug``, ``scan``, ``prompt_tokens``, ``prompt``, settings), ``qParams``
(``pinnedIds``, ``supernodes`` as ``[label, node_id, ...]`` lists), ``nodes`` and ``links``
(``{source, target, weight}``), validated against ``neuronpedia-graph-schema.json`` (the structure
of Neuronpedia's ``graph-schema.json``). Node ids follow DESIGN.md: feature
``{layer}_{feature}_{pos}``, error ``{layer}_-1_{pos}``, embedding ``E_{token_id}_{pos}``, logit
``{n_layers + 1}_{token_id}_{pos}``; a feature node's ``feature`` is the Cantor pair of
``(layer, feature)``.
"""

from __future__ import annotations

import re
import time

from mechscope.export.schema import read_neuronpedia, validate_neuronpedia, write_neuronpedia
from mechscope.graph.effects import signed_effects
from mechscope.graph.graph import Graph, NodeKind
from mechscope.graph.prune import PruneResult, kept_edges
from mechscope.node_ids import cantor_pair

__all__ = ["to_neuronpedia", "write_neuronpedia", "read_neuronpedia", "validate_neuronpedia", "cantor_pair", "slugify"]

FEATURE_TYPES = {
    NodeKind.FEATURE: "cross layer transcoder",
    NodeKind.ERROR: "mlp reconstruction error",
    NodeKind.TOKEN: "embedding",
    NodeKind.LOGIT: "logit",
}


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug of a prompt (lowercase letters, digits and dashes)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return slug or "graph"


def _node(graph: Graph, node: int, influence: float, labels: dict[str, str], densities, effects) -> dict:
    kind = graph.node_kind(node)
    node_id = graph.node_id(node)
    entry = {"node_id": node_id, "feature_type": FEATURE_TYPES[kind], "influence": influence,
             "activation": None, "clerp": "", "token_prob": 0.0, "is_target_logit": False}
    if kind != NodeKind.LOGIT:  # signed, on the top logit target (see mechscope.graph.effects)
        entry.update(direct_effect=float(effects.direct[node, 0]), total_effect=float(effects.total[node, 0]))
    if kind == NodeKind.FEATURE:
        layer, pos, feature, activation = graph.feature_of(node)
        entry.update(feature=cantor_pair(layer, feature), layer=str(layer), ctx_idx=pos,
                     jsNodeId=f"{layer}_{feature}-0", activation=activation,
                     clerp=labels.get(f"{layer}/{feature}", ""))
        if densities is not None:
            entry["density"] = float(densities[layer][feature])
    elif kind == NodeKind.ERROR:
        layer, pos = graph.error_of(node)
        entry.update(feature=-1, layer=str(layer), ctx_idx=pos, jsNodeId=f"{layer}_{pos}-0",
                     clerp=f"error at layer {layer}")
    elif kind == NodeKind.TOKEN:
        pos = node - graph.token_offset
        token_id = int(graph.input_ids[pos])
        entry.update(feature=pos, layer="E", ctx_idx=pos, jsNodeId=f"E_{token_id}-{pos}",
                     clerp=f"Embedding {graph.input_tokens[pos]!r}")
    else:
        k = node - graph.logit_offset
        token_id, prob = int(graph.logit_token_ids[k]), float(graph.logit_probabilities[k])
        entry.update(feature=token_id, layer=str(graph.n_layers + 1), ctx_idx=graph.n_pos - 1,
                     jsNodeId=f"L_{token_id}-{graph.n_pos - 1}", token_prob=prob, is_target_logit=k == 0,
                     clerp=_logit_label(graph, k, prob))
    return entry


def _logit_label(graph: Graph, k: int, prob: float) -> str:
    diff = graph.config.get("logit_diff")
    if diff:
        a, b = graph.logit_tokens[k].split(" - ", 1) if " - " in graph.logit_tokens[k] else diff
        return f'Logit difference "{a}" - "{b}"'
    return f'Output "{graph.logit_tokens[k]}" (p={prob:.3f})'


def to_neuronpedia(
    graph: Graph,
    pruned: PruneResult | None,
    slug: str,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
    labels: dict[str, str] | None = None,
    supernodes: list[list[str]] | None = None,
    densities=None,
) -> dict:
    """The exchange JSON of ``graph``, keeping the nodes and edges ``pruned`` keeps (all when None).

    Args:
        labels: human feature labels keyed ``"layer/feature"`` (become ``clerp``), e.g.
            ``FeatureStore.labels()``.
        Every node but the logits carries ``direct_effect`` and ``total_effect``: its signed effect on
        the top logit target (``metadata.effects_target``), in demeaned-logit units
        (:func:`mechscope.graph.effects.signed_effects`; ``influence`` is unsigned).
        densities: ``[n_layers, d_transcoder]`` activation densities from a feature store
            (``FeatureStore.density_table()``); feature nodes then carry ``density`` (an extra field
            Neuronpedia ignores; ``suggest_supernodes`` leaves dense features out).
        supernodes: ``[label, node_id, ...]`` lists for ``qParams.supernodes``.
    """
    from mechscope import __version__

    n = graph.n_nodes
    node_mask = pruned.node_mask if pruned is not None else None
    influence = pruned.cumulative_scores if pruned is not None else None
    kept = [i for i in range(n) if node_mask is None or bool(node_mask[i])]
    labels = labels or {}
    effects = signed_effects(graph)
    nodes = [_node(graph, i, None if influence is None else float(influence[i]), labels, densities, effects)
             for i in kept]
    ids = [graph.node_id(i) for i in range(n)]
    links = []  # between kept nodes only (kept_edges), in row blocks: no N x N copies
    for targets, sources, weights in kept_edges(graph.adjacency, pruned):
        links += [{"source": ids[s], "target": ids[t], "weight": w}
                  for t, s, w in zip(targets.tolist(), sources.tolist(), weights.tolist())]
    config = graph.config
    chat = {"chat": config["chat"]} if config.get("chat") else {}
    return {
        "metadata": {
            **chat,
            "slug": slug,
            "scan": graph.transcoder_set,
            "transcoder_list": [],
            "prompt_tokens": graph.input_tokens,
            "prompt": graph.prompt,
            "model_id": graph.model_id,
            "effects_target": graph.logit_tokens[0] if graph.n_logits else None,
            "transcoder_kind": config.get("transcoder_kind", "per-layer"),
            "node_threshold": node_threshold if node_threshold is not None else 1.0,
            "schema_version": 1,
            "info": {
                "description": f"mechscope attribution graph of {graph.prompt!r}",
                "generator": {"name": "mechscope", "version": __version__},
                "create_time_ms": time.time() * 1000,
            },
            "generation_settings": {
                "max_n_logits": config.get("max_n_logits", graph.n_logits),
                "desired_logit_prob": config.get("desired_logit_prob", 0.95),
                "batch_size": config.get("batch_size", 0),
                "max_feature_nodes": config.get("max_feature_nodes") or len(graph.active_features),
            },
            "pruning_settings": {
                "node_threshold": node_threshold if node_threshold is not None else 1.0,
                "edge_threshold": edge_threshold if edge_threshold is not None else 1.0,
            },
        },
        "qParams": {"pinnedIds": [], "supernodes": supernodes or [], "linkType": "both",
                    "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
