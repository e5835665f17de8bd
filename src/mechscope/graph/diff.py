"""Diffs of two attribution graphs of the same model and transcoder set.

Two prompts that differ by a word ("How do I make a bomb?" / "How do I detect a bomb?") give two
graphs; the question is which features carry the difference. :func:`diff_graphs`:

1. **aligns positions by their tokens**: a sequence alignment (``difflib.SequenceMatcher``, no
   junk heuristic) matches the shared prefix and suffix; inside a replaced stretch the tokens pair
   up from its end, so a substituted word ("make" / "detect") lines up, a word of more tokens lines
   up by its last token ("Jordan" / "Bat|kin"), and inserted or deleted tokens stay unaligned;
2. **matches features** by ``(layer, feature index)`` at aligned positions;
3. **reports** the matched features whose activation or signed total effect on the top target
   (``total_effect``, see :mod:`mechscope.graph.effects`) differs most, the features present in
   only one graph (by ``|total_effect|``), supernodes (``qParams.supernodes``) of either graph
   by their summed activation and total effect, and the share of the |total effect| carried by
   error nodes in each graph.

Graphs are compared as exported (the exchange JSON, usually pruned): "only in A" means "not among
B's kept nodes at the aligned position", not necessarily inactive there. :func:`diff_graph_json`
writes a graph JSON the explorer opens: one column per aligned position, every node marked by the
graph it comes from (``diff_side``: ``both``, ``a``, ``b``) with both graphs' values, and edges
weighted ``B - A``. Works on the exchange JSON only: no model, no torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from mechscope.errors import BadInputError

__all__ = ["align_positions", "FeatureDiff", "GraphDiff", "diff_graphs", "diff_graph_json"]

_FEATURE = "cross layer transcoder"


def align_positions(tokens_a: list[str], tokens_b: list[str]) -> list[tuple[int | None, int | None]]:
    """Columns of the alignment, in order: ``(pos_a, pos_b)``, one side ``None`` where a token has no
    partner (an insertion or deletion)."""
    columns: list[tuple[int | None, int | None]] = []
    matcher = difflib.SequenceMatcher(None, tokens_a, tokens_b, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            columns += [(a0 + k, b0 + k) for k in range(a1 - a0)]
        elif op == "replace":
            columns += _pair_replaced(tokens_a, tokens_b, a0, a1, b0, b1)
        elif op == "delete":
            columns += [(a, None) for a in range(a0, a1)]
        else:  # insert
            columns += [(None, b) for b in range(b0, b1)]
    return columns


def _pair_replaced(tokens_a, tokens_b, a0, a1, b0, b1) -> list[tuple[int | None, int | None]]:
    """Inside a replaced stretch, the shorter side pairs with the end of the longer one (the tokens
    next to the shared suffix): a word split into more tokens ("Jordan" / "Bat" "kin") lines up by its
    last token, where the model has read the whole word; the longer side's first tokens stay unaligned."""
    n_a, n_b = a1 - a0, b1 - b0
    n = min(n_a, n_b)
    columns = [(a0 + k, None) for k in range(n_a - n)] + [(None, b0 + k) for k in range(n_b - n)]
    return columns + [(a1 - n + k, b1 - n + k) for k in range(n)]


@dataclass
class FeatureDiff:
    """One feature ``layer/feature`` at aligned positions: its values in each graph (``None`` where
    it is not a node of that graph)."""

    layer: int
    feature: int
    pos_a: int | None
    pos_b: int | None
    token: str
    activation_a: float | None
    activation_b: float | None
    effect_a: float | None
    effect_b: float | None
    label: str = ""

    @property
    def ref(self) -> str:
        where = self.pos_a if self.pos_a is not None else self.pos_b
        return f"{self.layer}/{self.feature}@{where}"

    def as_dict(self) -> dict:
        return {"feature": f"{self.layer}/{self.feature}", "pos_a": self.pos_a, "pos_b": self.pos_b,
                "token": self.token, "activation_a": self.activation_a, "activation_b": self.activation_b,
                "total_effect_a": self.effect_a, "total_effect_b": self.effect_b, "label": self.label}


@dataclass
class GraphDiff:
    """What differs between graphs A and B (see the module docstring).

    Attributes:
        columns: the position alignment ``(pos_a, pos_b)``.
        changed: matched features, largest change of activation or total effect first.
        only_a, only_b: features that are nodes of one graph only, largest ``|total effect|`` first.
        supernodes: ``{label: {"activation_a", "activation_b", "total_effect_a", "total_effect_b"}}``.
        error_share_a, error_share_b: share of the summed ``|total effect|`` carried by error nodes.
        targets_a, targets_b: the graphs' top logit targets (``metadata.effects_target``).
        warnings: what makes the comparison less direct (different targets: total effects are then
            on different logits; trace both graphs with the same ``--target`` or ``--logit-diff``).
    """

    columns: list[tuple[int | None, int | None]]
    changed: list[FeatureDiff]
    only_a: list[FeatureDiff]
    only_b: list[FeatureDiff]
    supernodes: dict[str, dict] = field(default_factory=dict)
    error_share_a: float = 0.0
    error_share_b: float = 0.0
    targets_a: str | None = None
    targets_b: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self, top: int | None = None) -> dict:
        cut = (lambda rows: rows[:top]) if top else (lambda rows: rows)
        return {"alignment": [list(c) for c in self.columns], "changed": [f.as_dict() for f in cut(self.changed)],
                "only_a": [f.as_dict() for f in cut(self.only_a)], "only_b": [f.as_dict() for f in cut(self.only_b)],
                "supernodes": self.supernodes, "error_share_a": self.error_share_a, "error_share_b": self.error_share_b,
                "target_a": self.targets_a, "target_b": self.targets_b, "warnings": self.warnings}


def _check_comparable(a: dict, b: dict) -> None:
    for key, what in (("model_id", "model"), ("scan", "transcoder set")):
        va, vb = a["metadata"].get(key), b["metadata"].get(key)
        if va != vb:
            raise BadInputError(f"the graphs come from different {what}s ({va!r} and {vb!r}); a diff compares "
                                f"graphs of one model and one transcoder set")


def _features(data: dict) -> dict[tuple[int, int, int], dict]:
    """``(layer, feature, pos) -> node`` of every feature node."""
    found = {}
    for node in data["nodes"]:
        if node["feature_type"] == _FEATURE:
            layer, feature, pos = (int(p) for p in node["node_id"].split("_"))
            found[(layer, feature, pos)] = node
    return found


def _error_share(data: dict) -> float:
    effects = [(node["feature_type"], abs(node.get("total_effect") or 0.0)) for node in data["nodes"]]
    total = sum(e for _, e in effects)
    return sum(e for kind, e in effects if kind == "mlp reconstruction error") / total if total else 0.0


def _supernode_sums(data: dict) -> dict[str, tuple[float, float]]:
    by_id = {node["node_id"]: node for node in data["nodes"]}
    sums = {}
    for entry in data.get("qParams", {}).get("supernodes", []):
        members = [by_id[n] for n in entry[1:] if n in by_id]
        sums[entry[0]] = (sum(m.get("activation") or 0.0 for m in members),
                          sum(m.get("total_effect") or 0.0 for m in members))
    return sums


def diff_graphs(a: dict, b: dict) -> GraphDiff:
    """Diff two exchange graph JSONs (``a`` and ``b``, e.g. from ``read_neuronpedia``).

    Raises:
        BadInputError: the graphs come from different models or transcoder sets.
    """
    _check_comparable(a, b)
    tokens_a, tokens_b = a["metadata"]["prompt_tokens"], b["metadata"]["prompt_tokens"]
    columns = align_positions(tokens_a, tokens_b)
    b_of = {pa: pb for pa, pb in columns if pa is not None and pb is not None}
    features_a, features_b = _features(a), _features(b)
    changed, only_a, matched_b = [], [], set()

    def value(node, key):
        return None if node is None else node.get(key)

    for (layer, feature, pa), node_a in features_a.items():
        pb = b_of.get(pa)
        node_b = features_b.get((layer, feature, pb)) if pb is not None else None
        token = tokens_a[pa] if pb is None or tokens_a[pa] == tokens_b[pb] else f"{tokens_a[pa]} | {tokens_b[pb]}"
        row = FeatureDiff(layer, feature, pa, pb if node_b is not None else None, token, value(node_a, "activation"),
                          value(node_b, "activation"), value(node_a, "total_effect"), value(node_b, "total_effect"),
                          node_a.get("clerp", "") or (node_b or {}).get("clerp", ""))
        if node_b is None:
            only_a.append(row)
        else:
            matched_b.add((layer, feature, pb))
            changed.append(row)
    only_b = [FeatureDiff(layer, feature, None, pb, tokens_b[pb], None, node.get("activation"), None,
                          node.get("total_effect"), node.get("clerp", ""))
              for (layer, feature, pb), node in features_b.items() if (layer, feature, pb) not in matched_b]

    def change(row: FeatureDiff) -> float:
        return max(abs((row.activation_b or 0.0) - (row.activation_a or 0.0)),
                   abs((row.effect_b or 0.0) - (row.effect_a or 0.0)))

    changed.sort(key=lambda r: -change(r))
    only_a.sort(key=lambda r: -abs(r.effect_a or 0.0))
    only_b.sort(key=lambda r: -abs(r.effect_b or 0.0))
    sums_a, sums_b = _supernode_sums(a), _supernode_sums(b)
    supernodes = {label: {"activation_a": sums_a.get(label, (None, None))[0], "activation_b": sums_b.get(label, (None, None))[0],
                          "total_effect_a": sums_a.get(label, (None, None))[1], "total_effect_b": sums_b.get(label, (None, None))[1]}
                  for label in list(dict.fromkeys([*sums_a, *sums_b]))}
    target_a, target_b = a["metadata"].get("effects_target"), b["metadata"].get("effects_target")
    warnings = []
    if target_a != target_b:
        warnings.append(f"the graphs explain different targets ({target_a!r} and {target_b!r}): total effects are on "
                        "different logits; trace both with the same --target (or --logit-diff) to compare them")
    return GraphDiff(columns, changed, only_a, only_b, supernodes, _error_share(a), _error_share(b),
                     target_a, target_b, warnings)


def diff_graph_json(a: dict, b: dict, slug: str = "diff") -> dict:
    """A graph JSON of the diff for the explorer: one column per aligned position (tokens ``"A | B"``
    where they differ), the union of both graphs' nodes with ``diff_side`` and both graphs' values
    (``activation_a``/``_b``, ``total_effect_a``/``_b``; ``activation`` and ``influence`` from B when
    the node is in B, else A), and the union of edges weighted ``B - A``.

    Raises:
        BadInputError: the graphs come from different models or transcoder sets.
    """
    _check_comparable(a, b)
    ta, tb = a["metadata"]["prompt_tokens"], b["metadata"]["prompt_tokens"]
    columns = align_positions(ta, tb)
    col_a = {pa: c for c, (pa, _) in enumerate(columns) if pa is not None}
    col_b = {pb: c for c, (_, pb) in enumerate(columns) if pb is not None}
    tokens = [ta[pa] if pb is None else tb[pb] if pa is None or ta[pa] == tb[pb] else f"{ta[pa]} | {tb[pb]}"
              for pa, pb in columns]

    def new_id(node: dict, cols: dict[int, int]) -> str:
        head, _, pos = node["node_id"].rpartition("_")
        column = cols[int(node["ctx_idx"])]
        if node["feature_type"] == "logit":
            column = len(columns) - 1
        return f"{head}_{column}"

    nodes: dict[str, dict] = {}
    ids = {}
    for side, data, cols in (("a", a, col_a), ("b", b, col_b)):
        for node in data["nodes"]:
            nid = new_id(node, cols)
            if node["feature_type"] == "logit" and nid in nodes and nodes[nid].get("clerp") != node.get("clerp"):
                nid = f"{nid}_{side}"  # one token id, two targets (a logit difference and a plain logit): keep both
            ids[(side, node["node_id"])] = nid
            merged = nodes.setdefault(nid, {**node, "node_id": nid, "diff_side": side})
            if merged["diff_side"] != side:
                merged["diff_side"] = "both"
                merged.update({k: node[k] for k in ("activation", "influence", "clerp") if node.get(k) is not None})
            merged["ctx_idx"] = len(columns) - 1 if node["feature_type"] == "logit" else cols[int(node["ctx_idx"])]
            merged[f"activation_{side}"] = node.get("activation")
            merged[f"total_effect_{side}"] = node.get("total_effect")
            merged.pop("direct_effect", None)  # one graph's effect would read as the diff's: both are kept as _a / _b
            merged.pop("total_effect", None)
    weights: dict[tuple[str, str], float] = {}
    for side, data, sign in (("a", a, -1.0), ("b", b, 1.0)):
        for link in data["links"]:
            key = (ids[(side, link["source"])], ids[(side, link["target"])])
            weights[key] = weights.get(key, 0.0) + sign * float(link["weight"])
    meta = dict(b["metadata"])
    meta.update(slug=slug, prompt=f"{a['metadata']['prompt']}  ||  {b['metadata']['prompt']}", prompt_tokens=tokens,
                diff={"a": a["metadata"].get("slug"), "b": b["metadata"].get("slug"), "alignment": [list(c) for c in columns],
                      "edge_weights": "B - A"})
    meta.pop("chat", None)
    return {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                          "sg_pos": ""},
            "nodes": list(nodes.values()),
            "links": [{"source": s, "target": t, "weight": w} for (s, t), w in weights.items() if w != 0.0]}
