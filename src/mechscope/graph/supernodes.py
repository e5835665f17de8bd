"""Supernodes: labelled groups of graph nodes, suggested from edge profiles, and the grouped view.

A supernode groups nodes a researcher believes play one role ("Texas", "say Austin"); Lindsey et
al. 2025 ("On the Biology of a Large Language Model", section "Methods: supernodes") group
features by hand and test groups with interventions. They live in the graph exchange JSON's
``qParams.supernodes`` as ``[label, node_id, ...]`` lists, the format Neuronpedia's graph explorer
reads and writes.

:func:`suggest_supernodes` proposes groups for a person to accept or edit (automatic grouping
is an open request in Neuronpedia, issue #145): feature nodes whose *edge profiles* (normalised
incoming and outgoing edge weights over every node of the pruned graph) have high cosine
similarity are merged by average-linkage agglomerative clustering; features of different
prompt positions are only merged when their profiles say so. Each group is labelled from what its
members share: the input token where most of them sit and the logit they influence most.

Everything here works on the exchange JSON (a ``dict``), so no model is needed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from mechscope.errors import BadInputError
from mechscope.graph.prune import compute_influence, normalize_matrix

__all__ = ["Supernode", "dense_feature_nodes", "read_supernodes", "add_supernode", "remove_supernode", "suggest_supernodes",
           "supernode_view", "SupernodeView"]

_FEATURE = "cross layer transcoder"


@dataclass(frozen=True)
class Supernode:
    """A labelled group of node ids (``qParams.supernodes`` entry ``[label, *node_ids]``).

    Attributes:
        score: for suggestions, the mean pairwise cosine similarity of the members' edge profiles.
    """

    label: str
    node_ids: tuple[str, ...]
    score: float | None = None

    def as_list(self) -> list[str]:
        return [self.label, *self.node_ids]


def read_supernodes(data: dict) -> list[Supernode]:
    """The supernodes stored in a graph JSON."""
    return [Supernode(entry[0], tuple(entry[1:])) for entry in data.get("qParams", {}).get("supernodes", [])]


def add_supernode(data: dict, supernode: Supernode, replace: bool = False) -> dict:
    """Add ``supernode`` to ``data['qParams']['supernodes']`` (in place; returns ``data``).

    Raises:
        BadInputError: an empty label or member list, a node id not in the graph, or a label
            already used (unless ``replace``).
    """
    if not supernode.label.strip():
        raise BadInputError("a supernode needs a non-empty label")
    if not supernode.node_ids:
        raise BadInputError(f"supernode {supernode.label!r} needs at least one node id")
    known = {node["node_id"] for node in data["nodes"]}
    missing = [n for n in supernode.node_ids if n not in known]
    if missing:
        examples = ", ".join(sorted(known)[:8])
        raise BadInputError(f"node ids {missing} are not in the graph; its node ids look like: {examples}, ...")
    q = data.setdefault("qParams", {})
    existing = q.setdefault("supernodes", [])
    labels = [entry[0] for entry in existing]
    if supernode.label in labels:
        if not replace:
            raise BadInputError(f"a supernode labelled {supernode.label!r} exists; existing labels: {labels}")
        existing[:] = [entry for entry in existing if entry[0] != supernode.label]
    existing.append(supernode.as_list())
    return data


def remove_supernode(data: dict, label: str) -> dict:
    """Remove the supernode ``label`` (in place).

    Raises:
        BadInputError: no supernode has that label (the message lists the labels).
    """
    existing = data.get("qParams", {}).get("supernodes", [])
    labels = [entry[0] for entry in existing]
    if label not in labels:
        raise BadInputError(f"no supernode labelled {label!r}; labels: {labels}")
    existing[:] = [entry for entry in existing if entry[0] != label]
    return data


def _adjacency(data: dict) -> tuple[list[str], torch.Tensor]:
    ids = [node["node_id"] for node in data["nodes"]]
    index = {node_id: i for i, node_id in enumerate(ids)}
    adjacency = torch.zeros(len(ids), len(ids))  # [target, source]
    for link in data["links"]:
        adjacency[index[link["target"]], index[link["source"]]] += float(link["weight"])
    return ids, adjacency


def _edge_profiles(adjacency: torch.Tensor, features: list[int]) -> torch.Tensor:
    """``[n_features, 2 * n_nodes]`` unit vectors: outgoing then incoming edge weights, each half
    scaled to unit norm so that inputs and outputs count equally."""
    out_edges = adjacency[:, features].T
    in_edges = adjacency[features, :]
    halves = [h / h.norm(dim=1, keepdim=True).clamp(min=1e-12) for h in (out_edges, in_edges)]
    profile = torch.cat(halves, dim=1)
    return profile / profile.norm(dim=1, keepdim=True).clamp(min=1e-12)


def _average_linkage(similarity: torch.Tensor, threshold: float) -> list[list[int]]:
    """Agglomerative clustering: merge the two clusters with the highest mean pairwise similarity
    while it is at least ``threshold``. ``similarity``: ``[n, n]`` symmetric.

    SciPy's average linkage (UPGMA, ``scipy.cluster.hierarchy.linkage``) on the distance
    ``1 - similarity``, cut at ``1 - threshold``: the mean distance between two clusters is one
    minus their mean similarity, and average linkage never merges at a smaller distance than an
    earlier merge, so the cut gives the clusters the merge loop stops at. Clusters come in order of
    their first member, members in index order; O(n^2) memory, seconds for thousands of nodes.
    """
    n = len(similarity)
    if n < 2:
        return [[i] for i in range(n)]
    import numpy as np
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    distance = (1.0 - similarity.double()).clamp(min=0.0).numpy()
    np.fill_diagonal(distance, 0.0)
    distance = (distance + distance.T) / 2  # exactly symmetric for squareform
    tree = linkage(squareform(distance, checks=False), method="average")
    labels = fcluster(tree, t=1.0 - threshold + 1e-12, criterion="distance")
    clusters: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        clusters.setdefault(label, []).append(i)
    return sorted(clusters.values(), key=lambda c: c[0])


def _influence_on_logits(data: dict, adjacency: torch.Tensor) -> torch.Tensor:
    """``[n_nodes, n_logits]`` direct plus indirect influence of each node on each logit node, on
    the normalised adjacency (the definition pruning uses, :mod:`mechscope.graph.prune`)."""
    normalized = normalize_matrix(adjacency)
    logits = [i for i, node in enumerate(data["nodes"]) if node["feature_type"] == "logit"]
    columns = [compute_influence(normalized, torch.eye(len(adjacency))[i]) for i in logits]
    return torch.stack(columns, dim=1) if columns else torch.zeros(len(adjacency), 0)


def _label(data: dict, members: list[int], influence: torch.Tensor, logit_names: list[str]) -> str:
    nodes = data["nodes"]
    tokens = data["metadata"].get("prompt_tokens", [])
    positions = Counter(int(nodes[m].get("ctx_idx", 0)) for m in members)
    pos = positions.most_common(1)[0][0]
    token = tokens[pos] if pos < len(tokens) else f"pos {pos}"
    layers = sorted(int(nodes[m]["layer"]) for m in members)
    clerps = Counter(nodes[m].get("clerp", "") for m in members if nodes[m].get("clerp"))
    name = clerps.most_common(1)[0][0] if clerps else f"{token.strip() or repr(token)!s}"
    target = ""
    if influence.shape[1]:
        target = f" -> {logit_names[int(influence[members].sum(0).argmax())]}"
    return f"{name} (L{layers[0]}-L{layers[-1]}){target}"


def dense_feature_nodes(data: dict, max_density: float = 0.5) -> list[str]:
    """Ids of feature nodes whose ``density`` (from the feature store, see ``to_neuronpedia``) exceeds
    ``max_density``: features active on most tokens, which the circuits update found to encode
    position, tokenization or syntax rather than the prompt's concepts."""
    return [node["node_id"] for node in data["nodes"]
            if node["feature_type"] == _FEATURE and (node.get("density") or 0.0) > max_density]


def suggest_supernodes(data: dict, min_similarity: float = 0.6, min_size: int = 2,
                       max_density: float | None = 0.5) -> list[Supernode]:
    """Suggest supernodes for the feature nodes of a (pruned) graph JSON.

    Args:
        min_similarity: merge clusters while their mean pairwise cosine similarity of edge
            profiles is at least this (0..1).
        min_size: smallest group suggested.
        max_density: feature nodes with a larger ``density`` (see :func:`dense_feature_nodes`) are
            left out; ``None`` keeps every feature. Graphs without densities keep every feature.

    Returns:
        Suggestions, largest total influence first; labels are unique.

    Raises:
        BadInputError: ``min_similarity`` outside ``[0, 1]`` or ``min_size`` < 1.
    """
    if not 0.0 <= min_similarity <= 1.0:
        raise BadInputError(f"min_similarity must be between 0 and 1, got {min_similarity}")
    if min_size < 1:
        raise BadInputError(f"min_size must be at least 1, got {min_size}")
    if max_density is not None and not 0.0 <= max_density <= 1.0:
        raise BadInputError(f"max_density must be between 0 and 1, got {max_density}")
    ids, adjacency = _adjacency(data)
    dense = set(dense_feature_nodes(data, max_density)) if max_density is not None else set()
    features = [i for i, node in enumerate(data["nodes"])
                if node["feature_type"] == _FEATURE and node["node_id"] not in dense]
    if not features:
        return []
    profiles = _edge_profiles(adjacency, features)
    similarity = profiles @ profiles.T
    clusters = [c for c in _average_linkage(similarity, min_similarity) if len(c) >= min_size]
    influence = _influence_on_logits(data, adjacency)
    logit_names = [node.get("clerp", node["node_id"]) for node in data["nodes"] if node["feature_type"] == "logit"]
    logit_names = [name.split('"')[1] if name.count('"') >= 2 else name for name in logit_names]
    logit_names = [repr(name) for name in logit_names]
    weight = influence.sum(1)
    clusters.sort(key=lambda c: -float(weight[[features[i] for i in c]].sum()))
    suggestions, used = [], Counter()
    for cluster in clusters:
        members = [features[i] for i in cluster]
        label = _label(data, members, influence, logit_names)
        used[label] += 1
        if used[label] > 1:
            label = f"{label} #{used[label]}"
        sub = similarity[cluster][:, cluster]
        score = float((sub.sum() - sub.diagonal().sum()) / max(len(cluster) * (len(cluster) - 1), 1))
        suggestions.append(Supernode(label, tuple(ids[m] for m in members), round(score, 4)))
    return suggestions


@dataclass
class SupernodeView:
    """The graph with each supernode collapsed into one node.

    Attributes:
        names: group names: supernode labels, then every node in no supernode by its id.
        members: node ids of each group.
        adjacency: ``[n_groups, n_groups]`` summed edge weights (target row, source column).
    """

    names: list[str]
    members: list[list[str]]
    adjacency: torch.Tensor

    def edges(self, top: int | None = None) -> list[tuple[str, str, float]]:
        """``(source, target, weight)`` between distinct groups, strongest first."""
        t, s = (self.adjacency != 0).nonzero(as_tuple=True)
        rows = [(self.names[b], self.names[a], float(self.adjacency[a, b])) for a, b in zip(t.tolist(), s.tolist())
                if a != b]
        rows.sort(key=lambda r: -abs(r[2]))
        return rows[:top] if top else rows


def supernode_view(data: dict) -> SupernodeView:
    """Aggregate edges between supernodes (summing member edges; nodes in no supernode stay
    single). A node in several supernodes counts in the first that lists it.

    Raises:
        BadInputError: a supernode names a node id that is not in the graph.
    """
    ids, adjacency = _adjacency(data)
    index = {node_id: i for i, node_id in enumerate(ids)}
    group_of: dict[int, int] = {}
    names, members = [], []
    for supernode in read_supernodes(data):
        missing = [n for n in supernode.node_ids if n not in index]
        if missing:
            raise BadInputError(f"supernode {supernode.label!r} names node ids not in the graph: {missing}")
        fresh = [index[n] for n in supernode.node_ids if index[n] not in group_of]
        if not fresh:
            continue
        for i in fresh:
            group_of[i] = len(names)
        names.append(supernode.label)
        members.append([ids[i] for i in fresh])
    for i, node_id in enumerate(ids):
        if i not in group_of:
            group_of[i] = len(names)
            names.append(node_id)
            members.append([node_id])
    assign = torch.zeros(len(names), len(ids))  # [group, node]
    for node, group in group_of.items():
        assign[group, node] = 1.0
    return SupernodeView(names, members, assign @ adjacency @ assign.T)
