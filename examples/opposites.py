"""Case study (b): the opposite of "small" in English and of "petit" in French.

"On the Biology of a Large Language Model" (section "Multilingual circuits") finds shared,
language-independent features for antonymy and size that language-specific features read in and
out. Here: trace both prompts, take each graph's feature nodes at the last position (where the
answer is computed) with the most influence on its top answer, find the features (layer, index)
in both sets, then zero them, and suppress them -10x, at the last position of both prompts and read
both answers. Control: as many random features active at the same layers and position.

    .venv/bin/python examples/opposites.py
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

PROMPTS = {"en": 'The opposite of "small" is "', "fr": 'Le contraire de "petit" est "'}
TOP_FEATURES = 40


def influential_features(graph, k: int) -> dict[tuple[int, int], float]:
    """(layer, feature) -> influence on the top logit of the k most influential feature nodes at the
    last position."""
    scores = logit_influence(graph, 0)[: graph.n_features]
    last = [n for n in range(graph.n_features) if graph.feature_of(n)[1] == graph.n_pos - 1]
    last.sort(key=lambda n: -float(scores[n]))
    return {(graph.feature_of(n)[0], graph.feature_of(n)[2]): float(scores[n]) for n in last[:k]}


def answer_report(rm, graph, interventions, title: str) -> None:
    decode = rm.model.tokenizer.decode
    result = run_interventions(rm, graph.input_ids, interventions, InterventionConfig(freeze_attention=True, generate=4))
    probs = {w: torch.softmax(getattr(result, f"{w}_logits"), -1) for w in ("clean", "intervened")}
    answers = graph.logit_token_ids[:3].tolist()
    print(f"  {title}: " + ", ".join(f"p({decode([t])!r}) {float(probs['clean'][t]):.3f} -> "
                                     f"{float(probs['intervened'][t]):.3f}" for t in answers))
    print("    top after: " + ", ".join(f"{decode([i])!r} {p:.3f}" for i, p in result.top_tokens("intervened", 3)) +
          f"; continuation {decode(result.intervened_continuation)!r}")


def main() -> None:
    model = load_model("gemma-3-270m")
    rm = ReplacementModel(model, load_transcoder_set("gemma-3-270m-plt-v1"))
    graphs = {lang: attribute(rm, prompt) for lang, prompt in PROMPTS.items()}
    features = {}
    for lang, graph in graphs.items():
        print(f"{lang}: {PROMPTS[lang]!r} -> " +
              ", ".join(f"{t!r} {float(p):.3f}" for t, p in list(zip(graph.logit_tokens, graph.logit_probabilities))[:4]))
        features[lang] = influential_features(graph, TOP_FEATURES)
    shared = sorted(set(features["en"]) & set(features["fr"]))
    print(f"top-{TOP_FEATURES} last-position features by influence: {len(shared)} shared: " +
          ", ".join(f"L{lay}/{f}" for lay, f in shared))
    if not shared:
        print("no shared features among the most influential ones; nothing to suppress")
        return
    gen = torch.Generator().manual_seed(0)
    for lang, graph in graphs.items():
        last = graph.n_pos - 1
        target = SupernodeTarget("shared", tuple(FeatureTarget(lay, f, (last,)) for lay, f in shared))
        trace = rm.trace(graph.input_ids)
        control = []
        for layer, feature in shared:
            active = [int(i) for i in trace.activations[layer][last].nonzero().flatten() if (layer, int(i)) not in shared]
            control.append(FeatureTarget(layer, active[int(torch.randint(len(active), (1,), generator=gen))], (last,)))
        control_target = SupernodeTarget("control", tuple(control))
        print(f"\n== {lang}: the {len(shared)} shared features at the last position")
        answer_report(rm, graph, [Intervention(target, "zero")], "zero shared")
        answer_report(rm, graph, [Intervention(target, "scale", -10.0)], "shared x-10")
        answer_report(rm, graph, [Intervention(control_target, "zero")], "zero control")
        answer_report(rm, graph, [Intervention(control_target, "scale", -10.0)], "control x-10")


if __name__ == "__main__":
    main()
