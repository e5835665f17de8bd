"""Case study (a): "Fact: Michael Jordan plays the sport of" -> " basketball".

1. Trace the prompt and find two groups of features in its attribution graph: *entity* features
   at the " Michael" / " Jordan" positions with the most influence on the " basketball" logit, and
   *say basketball* features at the last position with the strongest direct edges to it.
2. Suppress each group by -10x on the real model (frozen attention, iterative patching) and read
   the basketball probability and the other group's activation.
3. Trace a tennis prompt ("Fact: Roger Federer plays the sport of" -> " tennis"), take its
   *say tennis* features, and inject them at the last position of the Jordan prompt with the
   activations they had there, with and without suppressing *say basketball*.

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

PROMPT = "Fact: Michael Jordan plays the sport of"
TENNIS_PROMPT = "Fact: Roger Federer plays the sport of"
GROUP_SIZE = 8


def token_id(model, text: str) -> int:
    (tid,) = model.tokenizer(text, add_special_tokens=False).input_ids
    return tid


def logit_index(graph, tid: int) -> int:
    return graph.logit_token_ids.tolist().index(tid)


def top_features(graph, scores: torch.Tensor, positions: set[int], k: int) -> list[tuple[int, int, int, float]]:
    """``(layer, feature, pos, activation)`` of the k feature nodes at ``positions`` scoring highest."""
    nodes = [n for n in range(graph.n_features) if graph.feature_of(n)[1] in positions]
    nodes.sort(key=lambda n: -float(scores[n]))
    return [(lay, f, p, a) for lay, p, f, a in (graph.feature_of(n) for n in nodes[:k])]


def group(label: str, features) -> SupernodeTarget:
    return SupernodeTarget(label, tuple(FeatureTarget(lay, f, (p,)) for lay, f, p, _ in features))


def describe(label: str, features) -> None:
    print(f"{label}: " + ", ".join(f"L{lay}/{f}@{p} ({a:.1f})" for lay, f, p, a in features))


def report(rm, ids, interventions, tokens: dict[str, int], readouts=None, title=""):
    result = run_interventions(rm, ids, interventions, InterventionConfig(freeze_attention=True, generate=6),
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


def main() -> None:
    model = load_model("gemma-3-270m")
    rm = ReplacementModel(model, load_transcoder_set("gemma-3-270m-plt-v1"))
    basketball, tennis = token_id(model, " basketball"), token_id(model, " tennis")

    graph = attribute(rm, PROMPT)
    last = graph.n_pos - 1
    entity_pos = {p for p, t in enumerate(graph.input_tokens) if t in (" Michael", " Jordan")}
    k = logit_index(graph, basketball)
    print(f"prompt tokens: {graph.input_tokens}")
    print(f"logit targets: " + ", ".join(f"{t!r} {float(p):.3f}" for t, p in zip(graph.logit_tokens, graph.logit_probabilities)))
    entity = top_features(graph, logit_influence(graph, k), entity_pos, GROUP_SIZE)
    direct = graph.adjacency[graph.logit_offset + k, : graph.n_features]
    say_basketball = top_features(graph, direct, {last}, GROUP_SIZE)
    describe("Michael Jordan (entity) features", entity)
    describe("say basketball features", say_basketball)
    entity_group, say_group = group("Michael Jordan", entity), group("say basketball", say_basketball)
    readouts = {"say basketball": list(say_group.members), "Michael Jordan": list(entity_group.members)}
    tokens = {" basketball": basketball, " tennis": tennis}
    ids = graph.input_ids

    report(rm, ids, [Intervention(entity_group, "scale", -10.0)], tokens, readouts, "suppress Michael Jordan x-10")
    report(rm, ids, [Intervention(say_group, "scale", -10.0)], tokens, readouts, "suppress say basketball x-10")

    tennis_graph = attribute(rm, TENNIS_PROMPT)
    kt = logit_index(tennis_graph, tennis)
    tennis_direct = tennis_graph.adjacency[tennis_graph.logit_offset + kt, : tennis_graph.n_features]
    say_tennis = top_features(tennis_graph, tennis_direct, {tennis_graph.n_pos - 1}, GROUP_SIZE)
    print(f"\ntennis prompt: p(' tennis') = {float(tennis_graph.logit_probabilities[kt]):.3f}")
    describe("say tennis features (tennis prompt)", say_tennis)
    inject = [Intervention(FeatureTarget(lay, f, (last,)), "set", a) for lay, f, _, a in say_tennis]
    report(rm, ids, inject, tokens, title="inject say tennis at the last position")
    report(rm, ids, inject + [Intervention(say_group, "scale", -10.0)], tokens,
           title="inject say tennis and suppress say basketball x-10")
    inject2 = [Intervention(FeatureTarget(lay, f, (last,)), "set", 2 * a) for lay, f, _, a in say_tennis]
    report(rm, ids, inject2 + [Intervention(say_group, "scale", -10.0)], tokens,
           title="inject say tennis at 2x its activation and suppress say basketball x-10")


if __name__ == "__main__":
    main()
