"""``mechscope intervene PROMPT --graph GRAPH.json ...``: test a circuit on the real model.

TARGET is a node id of the graph (feature ``{layer}_{feature}_{pos}``, error ``{layer}_-1_{pos}``)
or the label of one of its supernodes (``qParams.supernodes``). The model and transcoder set
default to the ones the graph was traced with.
"""

from __future__ import annotations

import json
import math

import click

from mechscope.cli.chat_options import chat_options
from mechscope.cli.options import placement_options
from mechscope.errors import BadInputError

__all__ = ["intervene"]


def _split_assignment(text: str, flag: str) -> tuple[str, float]:
    target, sep, value = text.rpartition("=")
    if not sep or not target:
        raise BadInputError(f"{flag} expects TARGET=NUMBER, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise BadInputError(f"{flag} {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise BadInputError(f"{flag} {text!r}: the value must be finite")
    return target, number


def _parse_injection(spec: str):
    from mechscope.interventions.records import FeatureTarget, Intervention
    from mechscope.node_ids import FEATURE_FORMS, parse_feature_ref

    where, value = _split_assignment(spec, "--inject")
    try:
        ref = parse_feature_ref(where)
    except BadInputError as e:
        detail = str(e) if "positions" in str(e) else f"FEATURE must be one of {FEATURE_FORMS}"
        raise BadInputError(f"--inject expects FEATURE@POS=VALUE, got {spec!r}: {detail}") from None
    if ref.positions is None and "@" not in where:
        raise BadInputError(f"--inject {spec!r}: say where, e.g. {ref}@8=VALUE (or @all)")
    return Intervention(FeatureTarget(ref.layer, ref.feature, ref.positions), "add", value)


def parse_interventions(targets, scales, sets, zeros, injections) -> list:
    """The interventions the ``--scale/--set/--zero/--inject`` flags name (``targets``: a
    :class:`_Targets` of the graph, needed unless only ``--inject`` is given)."""
    from mechscope.interventions.records import Intervention

    interventions = []
    for operation, specs in (("scale", scales), ("set", sets)):
        for spec in specs:
            target, value = _split_assignment(spec, f"--{operation}")
            interventions.append(Intervention(targets.resolve(target), operation, value))
    interventions += [Intervention(targets.resolve(t), "zero") for t in zeros]
    return interventions + [_parse_injection(spec) for spec in injections]


def _parse_layers(text: str | None, n_layers: int) -> range | None:
    if text is None:
        return None
    start, colon, end = text.partition(":")
    try:
        layers = range(int(start) if start else 0, int(end) if end else n_layers)
    except ValueError:
        raise BadInputError(f"--layers expects START:END (integers), got {text!r}") from None
    if not colon or len(layers) == 0 or layers.start < 0 or layers.stop > n_layers:
        raise BadInputError(f"--layers {text!r} must be a non-empty range START:END within 0:{n_layers}")
    return layers


class _Targets:
    """Resolves TARGET strings against a graph JSON's node ids and supernode labels."""

    def __init__(self, data: dict):
        from mechscope.graph.supernodes import read_supernodes

        self.node_ids = {node["node_id"] for node in data["nodes"]}
        self.supernodes = {s.label: s for s in read_supernodes(data)}

    def resolve(self, name: str):
        from mechscope.interventions.records import SupernodeTarget, target_from_node_id

        if name in self.supernodes:
            members = tuple(target_from_node_id(n) for n in self.supernodes[name].node_ids)
            return SupernodeTarget(name, members)
        if name in self.node_ids:
            return target_from_node_id(name)
        from mechscope.interventions.records import FeatureTarget
        from mechscope.node_ids import FEATURE_FORMS, parse_feature_ref

        if "/" in name:  # a feature by LAYER/FEATURE[@POS]: any feature, active in the graph or not
            ref = parse_feature_ref(name)
            return FeatureTarget(ref.layer, ref.feature, ref.positions)
        labels = ", ".join(repr(label) for label in self.supernodes) or "(none)"
        raise BadInputError(
            f"unknown target {name!r}: not a node id of the graph nor a supernode label; supernodes: {labels}; "
            f"targets are node ids of the graph (12_3456_5 a feature, 12_-1_5 an error), features as {FEATURE_FORMS}, "
            "or supernode labels"
        )


def _check_prompt_matches_graph(tokens: list[str], graph_tokens: list[str], interventions, readouts) -> None:
    """Node ids name positions of the graph's prompt: refuse targets past the end of this prompt,
    warn when this prompt's tokens differ from the graph's (the same ids then sit on other words)."""
    def positions_of(target) -> list[int]:
        if hasattr(target, "members"):
            return [p for m in target.members for p in positions_of(m)]
        return list(target.positions or ())

    positions = [p for i in interventions if getattr(i, "target", None) is not None for p in positions_of(i.target)]
    positions += [p for members in readouts.values() for m in members for p in positions_of(m)]
    if positions and max(positions) >= len(tokens):
        raise BadInputError(
            f"a target sits at position {max(positions)}, but this prompt has {len(tokens)} tokens; the graph's prompt "
            f"has {len(graph_tokens)} — run the graph's own prompt (leave out PROMPT) or one of the same length"
        )
    if tokens != graph_tokens:
        first = next((i for i, (a, b) in enumerate(zip(tokens, graph_tokens)) if a != b), min(len(tokens), len(graph_tokens)))
        here = tokens[first] if first < len(tokens) else "(end)"
        there = graph_tokens[first] if first < len(graph_tokens) else "(end)"
        click.echo(f"warning: this prompt's tokens differ from the graph's from position {first} ({here!r} here, "
                   f"{there!r} in the graph): node ids refer to the graph's positions. Leave out PROMPT to run the "
                   "graph's own prompt (add --chat if it was traced with --chat).", err=True)


@click.command()
@click.argument("prompt", required=False)
@click.option("--graph", "graph_path", required=True, type=click.Path(dir_okay=False),
              help="Graph JSON written by `mechscope trace` (node ids and supernodes come from it).")
@click.option("--scale", "scales", multiple=True, metavar="TARGET=FACTOR", help="Multiply activations (e.g. =-10).")
@click.option("--set", "sets", multiple=True, metavar="TARGET=VALUE", help="Set activations to VALUE.")
@click.option("--zero", "zeros", multiple=True, metavar="TARGET", help="Zero activations (errors too).")
@click.option("--inject", "injections", multiple=True, metavar="LAYER/FEATURE@POS=VALUE",
              help="Add VALUE to a feature at POS (comma-separated, or 'all'); 16_759_8=VALUE and 16:759@8=VALUE work too.")
@click.option("--freeze-attention/--no-freeze-attention", default=True, show_default=True,
              help="Replay the clean attention patterns (first forward pass).")
@click.option("--layers", default=None, metavar="START:END",
              help="Constrained patching: clamp MLP outputs in this layer range (default: iterative).")
@click.option("--generate", type=int, default=0, show_default=True, help="Tokens to generate, clean and intervened.")
@click.option("--open-ended", is_flag=True, help="Also intervene at generated positions (targets at 'all').")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; else seeded sampling.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--readout", "readouts", multiple=True, metavar="SUPERNODE_LABEL",
              help="Report this supernode's activation as % of clean.")
@click.option("--token", "tokens", multiple=True, help="Report this token's probability and logit change, intervened minus clean (single token).")
@click.option("--logit-diff", nargs=2, default=None, metavar="A B",
              help="Report logit(A) - logit(B), clean and intervened (single tokens).")
@click.option("--top-k", type=int, default=10, show_default=True)
@click.option("--model", "model_name", default=None, help="Default: the graph's model.")
@click.option("--transcoders", "transcoders_name", default=None, help="Default: the graph's transcoder set.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@placement_options()
@chat_options
def intervene(prompt, chat_request, placement, graph_path, scales, sets, zeros, injections, freeze_attention, layers, generate, open_ended,
              temperature, seed, readouts, tokens, logit_diff, top_k, model_name, transcoders_name, as_json):
    """Run PROMPT clean and with interventions on the real model; compare outputs.

    Without PROMPT (and without --chat/--messages) the graph's own prompt is run, as it was traced
    (a chat graph's rendered conversation included)."""
    from mechscope.export.neuronpedia import read_neuronpedia
    from mechscope.interventions.records import FeatureTarget

    use_graph_prompt = prompt is None and not chat_request.active
    if not use_graph_prompt:
        chat_request.check(prompt)
    for name, value, low in (("--generate", generate, 0), ("--top-k", top_k, 1)):
        if value < low:
            raise BadInputError(f"{name} must be >= {low}, got {value}")
    if temperature < 0:
        raise BadInputError(f"--temperature must be >= 0, got {temperature}")
    data = read_neuronpedia(graph_path)
    if use_graph_prompt:
        prompt = data["metadata"]["prompt"]
    targets = _Targets(data)
    interventions = parse_interventions(targets, scales, sets, zeros, injections)
    if not interventions:
        raise BadInputError("no intervention given; use --scale, --set, --zero or --inject")
    readout_targets = {}
    for label in readouts:
        if label not in targets.supernodes:
            raise BadInputError(f"--readout {label!r} is not a supernode of the graph; supernodes: {list(targets.supernodes)}")
        members = [targets.resolve(n) for n in targets.supernodes[label].node_ids]
        readout_targets[label] = [m for m in members if isinstance(m, FeatureTarget)]

    from mechscope.interventions.intervene import InterventionConfig, run_interventions
    from mechscope.models.loading import model_name_for
    from mechscope.replacement.replacement_model import ReplacementModel
    from mechscope.transcoders.io import load_transcoder_set, resolve_transcoders

    metadata = data["metadata"]
    transcoders_name = transcoders_name or metadata["scan"]
    resolve_transcoders(transcoders_name)  # fail on a bad name before loading the model
    if model_name is None and not metadata.get("model_id"):
        raise BadInputError(f"{graph_path} names no model (metadata.model_id); pass --model")
    from mechscope.progress import Progress

    progress = Progress.for_terminal(quiet=as_json)
    progress.phase(f"loading {model_name or model_name_for(metadata['model_id'])} and {transcoders_name}")
    model = placement.load_model(model_name or model_name_for(metadata["model_id"]))
    prompt, _ = chat_request.render(model.tokenizer, prompt)
    rm = ReplacementModel(model, load_transcoder_set(transcoders_name))
    input_ids = rm.tokenize(prompt)
    _check_prompt_matches_graph(model.token_strings(input_ids), metadata["prompt_tokens"], interventions, readout_targets)
    token_ids = [_single_token(model, t) for t in tokens]
    diff_ids = [_single_token(model, t) for t in logit_diff] if logit_diff else None
    config = InterventionConfig(freeze_attention=freeze_attention, constrained_layers=_parse_layers(layers, model.n_layers),
                                generate=generate, open_ended=open_ended, temperature=temperature, seed=seed, top_k=top_k)
    progress.phase(f"clean and intervened runs ({len(interventions)} interventions"
                   + (f", {generate} tokens generated each" if generate else "") + ")")
    result = run_interventions(rm, input_ids, interventions, config, readout_targets)

    decode = model.tokenizer.decode
    summary = {
        which: {
            "top_tokens": [{"token": decode([i]), "token_id": i, "prob": p} for i, p in result.top_tokens(which, top_k)],
            "continuation": decode(getattr(result, f"{which}_continuation")),
        }
        for which in ("clean", "intervened")
    }
    summary["readouts"] = {label: r.percent_of_clean for label, r in result.readouts.items()}
    summary["readout_members"] = {
        label: [{"node_id": f"{layer}_{feature}_{pos}", "clean": float(c), "intervened": float(n),
                 "percent": 100.0 * float(n) / float(c) if float(c) else None}
                for (layer, feature, pos), c, n in zip(r.members, r.clean, r.intervened)]
        for label, r in result.readouts.items()
    }
    summary["interventions"] = [i.as_dict() for i in interventions]
    summary["tokens"] = [_token_report(result, decode([i]), i) for i in token_ids]
    if diff_ids:
        a, b = diff_ids
        values = {w: float(getattr(result, f"{w}_logits")[a] - getattr(result, f"{w}_logits")[b]) for w in ("clean", "intervened")}
        summary["logit_diff"] = {"tokens": [decode([a]), decode([b])], **values,
                                 "change": values["intervened"] - values["clean"]}
    summary["settings"] = {"freeze_attention": freeze_attention, "layers": layers, "generate": generate,
                           "open_ended": open_ended, "temperature": temperature, "seed": seed}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print(summary)


def _single_token(model, text: str) -> int:
    ids = model.tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise BadInputError(f"--token {text!r} is {len(ids)} tokens ({ids}); give a single token such as ' tennis'")
    return ids[0]


def _token_report(result, token: str, token_id: int) -> dict:
    import torch

    probs = {w: float(torch.softmax(getattr(result, f"{w}_logits"), -1)[token_id]) for w in ("clean", "intervened")}
    return {"token": token, "token_id": token_id, "logit_change": result.logit_change(token_id),
            "clean_prob": probs["clean"], "intervened_prob": probs["intervened"]}


def _print(summary: dict) -> None:
    echo = click.echo
    echo("interventions:")
    for i in summary["interventions"]:
        value = "" if i["operation"] == "zero" else f" {i['value']:g}"
        echo(f"  {i['operation']} {i['target']}{value} ({len(i['members'])} nodes)")
    echo(f"{'clean':>28}   {'intervened':>28}")
    for c, n in zip(summary["clean"]["top_tokens"], summary["intervened"]["top_tokens"]):
        echo(f"  {c['token']!r:>18} {c['prob']:.3f}   {n['token']!r:>18} {n['prob']:.3f}")
    if "logit_diff" in summary:
        d = summary["logit_diff"]
        echo(f"logit {d['tokens'][0]!r} - logit {d['tokens'][1]!r}: {d['clean']:+.3f} -> {d['intervened']:+.3f} "
             f"(change {d['change']:+.3f})")
    for t in summary["tokens"]:
        echo(f"token {t['token']!r}: p {t['clean_prob']:.3f} -> {t['intervened_prob']:.3f}, "
             f"logit change (intervened - clean) {t['logit_change']:+.3f}")
    for label, percent in summary["readouts"].items():
        echo(f"supernode {label!r}: {percent:.1f}% of clean activation")
        for m in summary["readout_members"][label]:
            share = "n/a (inactive when clean)" if m["percent"] is None else f"{m['percent']:.1f}%"
            echo(f"  {m['node_id']:>14}  {m['clean']:7.3f} -> {m['intervened']:7.3f}  {share}")
    if summary["settings"]["generate"]:
        echo(f"clean continuation:      {summary['clean']['continuation']!r}")
        echo(f"intervened continuation: {summary['intervened']['continuation']!r}")
