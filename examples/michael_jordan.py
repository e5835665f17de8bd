"""Case study (a): "Fact: Michael Jordan plays the sport of" -> " basketball".

1. Trace the prompt and find groups of features in its attribution graph: *entity* features at
   the " Jordan" position with the most influence on the " basketball" logit; at the last
   position, *say basketball* features whose direct edge to " basketball" most exceeds their mean
   edge to the other sports among the logit targets (football, hockey, baseball), and *say a
   sport* features with the strongest direct edges to " basketball" overall.
2. Zero each group, and suppress it -10x, on the real model (frozen attention, iterative
   patching); read p(" basketball") and the other groups' activations.
3. Trace a tennis prompt ("Fact: Roger Federer plays the sport of" -> " tennis"); swap the entity:
   at the " Jordan" position zero the Jordan entity features and set the Federer entity features
   (same selection on the tennis graph) to their activations there; also inject the tennis graph's
   say-a-sport features at the last position.
4. With a feature store (``mechscope features build``): pick the three groups again leaving out
   dense features (active on more than half of the corpus tokens), zero them, and zero the dense
   members of the original groups alone.

    .venv/bin/python examples/michael_jordan.py

Prints every figure the README quotes. Runs in a few minutes on 2 CPU cores (two attributions).
"""

from __future__ import annotations

import torch

from mechscope import (
    FeatureTarget,
    Intervention,
    InterventionConfig,
    ReplacementModel,
    SupernodeTarget,
    attribute,
    load_model,
    load_transcoder_set,
    logit_influence,
    run_interventions,
)
from mechscope.features.store import FeatureStore
from mechscope.paths import cache_root

PROMPT = "Fact: Michael Jordan plays the sport of"
TENNIS_PROMPT = "Fact: Roger Federer plays the sport of"
GROUP_SIZE = 8
MAX_DENSITY = 0.5


def token_id(model, text: str) -> int:
    (tid,) = model.tokenizer(text, add_special_tokens=False).input_ids
    return tid


def logit_index(graph, tid: int) -> int:
    return graph.logit_token_ids.tolist().index(tid)


def top_features(graph, scores: torch.Tensor, positions: set[int], k: int,
                 exclude: frozenset = frozenset()) -> list[tuple[int, int, int, float]]:
    """``(layer, feature, pos, activation)`` of the k feature nodes at ``positions`` scoring highest,
    leaving out ``(layer, feature)`` pairs in ``exclude``."""
    nodes = [n for n in range(graph.n_features) if graph.feature_of(n)[1] in positions
             and (graph.feature_of(n)[0], graph.feature_of(n)[2]) not in exclude]
    nodes.sort(key=lambda n: -float(scores[n]))
    return [(lay, f, p, a) for lay, p, f, a in (graph.feature_of(n) for n in nodes[:k])]


def group(label: str, features) -> SupernodeTarget:
    return SupernodeTarget(label, tuple(FeatureTarget(lay, f, (p,)) for lay, f, p, _ in features))


def describe(label: str, features) -> None:
    print(f"{label}: " + ", ".join(f"L{lay}/{f}@{p} ({a:.1f})" for lay, f, p, a in features))


def report(rm, ids, interventions, tokens: dict[str, int], readouts=None, title="", freeze=True):
    result = run_interventions(rm, ids, interventions, InterventionConfig(freeze_attention=freeze, generate=6),
                               readouts=readouts)
    probs = {w: torch.softmax(getattr(result, f"{w}_logits"), -1) for w in ("clean", "intervened")}
    decode = rm.model.tokenizer.decode
    print(f"\n== {title}")
    for name, tid in tokens.items():
        print(f"  p({name!r}): {float(probs['clean'][tid]):.3f} -> {float(probs['intervened'][tid]):.3f}")
    top = result.top_tokens("intervened", 3)
    print("  top after: " + ", ".join(f"{decode([i])!r} {p:.3f}" for i, p in top))
    for label, readout in result.readouts.items():
        print(f"  {label} activation: {readout.percent_of_clean:.0f}% of clean")
    print(f"  continuation: {decode(result.clean_continuation)!r} -> {decode(result.intervened_continuation)!r}")
    return result


def sports(graph, model) -> list[int]:
    """Logit-target indices of the other sports among the graph's targets."""
    names = (" football", " hockey", " baseball", " soccer", " golf")
    return [k for k, t in enumerate(graph.logit_tokens) if t in names]


def main() -> None:
    model = load_model("gemma-3-270m")
    rm = ReplacementModel(model, load_transcoder_set("gemma-3-270m-plt-v1"))
    basketball, tennis = token_id(model, " basketball"), token_id(model, " tennis")

    graph = attribute(rm, PROMPT)
    last = graph.n_pos - 1
    jordan_pos = graph.input_tokens.index(" Jordan")
    k = logit_index(graph, basketball)
    print(f"prompt tokens: {graph.input_tokens}")
    print("logit targets: " + ", ".join(f"{t!r} {float(p):.3f}" for t, p in zip(graph.logit_tokens, graph.logit_probabilities)))
    entity = top_features(graph, logit_influence(graph, k), {jordan_pos}, GROUP_SIZE)
    edges = graph.adjacency[graph.logit_offset:, : graph.n_features]
    others = sports(graph, model)
    contrast = edges[k] - edges[others].mean(0)
    say_basketball = top_features(graph, contrast, {last}, GROUP_SIZE)
    say_sport = top_features(graph, edges[k], {last}, GROUP_SIZE)
    print("other sports among the targets: " + ", ".join(graph.logit_tokens[o] for o in others))
    describe("Jordan (entity) features", entity)
    describe("say basketball (vs other sports) features", say_basketball)
    describe("say a sport (strongest direct) features", say_sport)
    groups = {"Jordan": group("Jordan", entity), "say basketball": group("say basketball", say_basketball),
              "say a sport": group("say a sport", say_sport)}
    readouts = {label: list(g.members) for label, g in groups.items()}
    tokens = {" basketball": basketball, " tennis": tennis}
    ids = graph.input_ids
    for label, g in groups.items():
        report(rm, ids, [Intervention(g, "zero")], tokens, readouts, f"zero {label}")
        report(rm, ids, [Intervention(g, "scale", -10.0)], tokens, readouts, f"suppress {label} x-10")

    tennis_graph = attribute(rm, TENNIS_PROMPT)
    kt = logit_index(tennis_graph, tennis)
    federer_pos = tennis_graph.input_tokens.index(" Federer")
    federer = top_features(tennis_graph, logit_influence(tennis_graph, kt), {federer_pos}, GROUP_SIZE)
    t_edges = tennis_graph.adjacency[tennis_graph.logit_offset + kt, : tennis_graph.n_features]
    say_tennis = top_features(tennis_graph, t_edges, {tennis_graph.n_pos - 1}, GROUP_SIZE)
    print(f"\ntennis prompt: p(' tennis') = {float(tennis_graph.logit_probabilities[kt]):.3f}")
    describe("Federer (entity) features", federer)
    describe("say a sport features of the tennis prompt", say_tennis)
    swap = [Intervention(groups["Jordan"], "zero")]
    swap += [Intervention(FeatureTarget(lay, f, (jordan_pos,)), "set", a) for lay, f, _, a in federer]
    report(rm, ids, swap, tokens, readouts, "swap entity: zero Jordan, set Federer features at ' Jordan'")
    report(rm, ids, swap, tokens, readouts, "the same swap with live attention", freeze=False)
    inject = [Intervention(FeatureTarget(lay, f, (last,)), "set", a) for lay, f, _, a in say_tennis]
    report(rm, ids, inject, tokens, title="inject the tennis prompt's say-a-sport features at the last position")

    store_path = cache_root() / "features" / "gemma-3-270m-plt-v1.sqlite"
    if not store_path.exists():
        print("\nno feature store: run `mechscope features build` for the dense-feature check")
        return
    density = FeatureStore(store_path).density_table()
    dense = frozenset((lay, f) for lay, f in zip(*(density > MAX_DENSITY).nonzero()))
    print(f"\n{len(dense)} features are active on more than {MAX_DENSITY:.0%} of the store's tokens")
    selections = {"Jordan": (logit_influence(graph, k), {jordan_pos}), "say basketball": (contrast, {last}),
                  "say a sport": (edges[k], {last})}
    for label, (scores, positions) in selections.items():
        members = [m for m in groups[label].members if (m.layer, m.feature) in dense]
        print(f"{label}: dense members " + (", ".join(f"L{m.layer}/{m.feature}" for m in members) or "none"))
        if members:
            dense_only = SupernodeTarget(f"dense {label}", tuple(members))
            report(rm, ids, [Intervention(dense_only, "zero")], tokens, title=f"zero the dense members of {label}")
        sparse = top_features(graph, scores, positions, GROUP_SIZE, exclude=dense)
        describe(f"{label} without dense features", sparse)
        report(rm, ids, [Intervention(group(label, sparse), "zero")], tokens, title=f"zero {label} without dense features")


if __name__ == "__main__":
    main()
