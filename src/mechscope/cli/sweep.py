"""``mechscope sweep PROMPT... | --prompts FILE``: behaviour rates with error bars (see
:mod:`mechscope.interventions.sweep`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mechscope.cli.chat_options import ChatRequest
from mechscope.cli.options import default_of, placement_options
from mechscope.errors import BadInputError
from mechscope.interventions.sweep import SweepConfig

__all__ = ["sweep"]


def _read_prompts(path: str) -> list[str]:
    """A JSONL file: one prompt per line, as a JSON string or ``{"prompt": "..."}``.

    Raises:
        BadInputError: a missing file, a line that is not JSON, or no prompt in it.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BadInputError(f"cannot read the prompts file {path!r}: {e.strerror}") from e
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise BadInputError(f"{path}:{number} is not JSON; --prompts takes JSONL: one \"prompt\" string or "
                                "{\"prompt\": \"...\"} per line") from None
        prompt = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadInputError(f"{path}:{number} holds no prompt; expected a string or {{\"prompt\": \"...\"}}")
        prompts.append(prompt)
    if not prompts:
        raise BadInputError(f"the prompts file {path!r} holds no prompt")
    return prompts


def _interventions(graph_path, scales, sets, zeros, injections):
    """Interventions named as in ``mechscope intervene`` (targets resolved against ``--graph``)."""
    from mechscope.cli.intervene import _Targets, parse_interventions

    named = [*scales, *sets, *zeros]
    if not named and not injections:
        return [], None
    data = None
    if named:
        if graph_path is None:
            raise BadInputError("--scale/--set/--zero name graph nodes or supernodes: give --graph GRAPH.json")
        from mechscope.export.neuronpedia import read_neuronpedia

        data = read_neuronpedia(graph_path)
    return parse_interventions(_Targets(data) if data else None, scales, sets, zeros, injections), data


def _plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mechscope.cli.options import save_figure

    rows = result.prompts
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    y = list(range(len(rows)))[::-1]
    rates = [r.rate for r in rows]
    errors = [[r.rate - r.ci[0] for r in rows], [r.ci[1] - r.rate for r in rows]]
    ax.errorbar(rates, y, xerr=errors, fmt="o", capsize=4)
    ax.set_yticks(y, [r.prompt if len(r.prompt) < 60 else r.prompt[:57] + "..." for r in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{result.settings['classifier']} rate (Wilson 95 % interval, n = {rows[0].n} each)")
    fig.tight_layout()
    save_figure(fig, path)


@click.command()
@click.argument("prompts", nargs=-1)
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help="JSONL file of prompts (a string or {\"prompt\": ...} per line) instead of PROMPT...")
@click.option("--chat", is_flag=True, help="Each prompt is a user turn, rendered with the model's chat template.")
@click.option("--system", default=None, help="System prompt (default: the template's own). Needs --chat.")
@click.option("--assistant-prefix", default=None, help="Text the assistant turn starts with. Needs --chat.")
@click.option("--model", "model_name", default=None, help="Default: the --graph's model, else gemma-3-270m.")
@click.option("--samples", type=int, default=default_of(SweepConfig, "samples"), show_default=True)
@click.option("--max-new-tokens", type=int, default=default_of(SweepConfig, "max_new_tokens"), show_default=True)
@click.option("--temperature", type=float, default=default_of(SweepConfig, "temperature"), show_default=True)
@click.option("--seed", type=int, default=default_of(SweepConfig, "seed"), show_default=True)
@click.option("--batch-size", type=int, default=default_of(SweepConfig, "batch_size"), show_default=True)
@click.option("--classifier", default="refusal", show_default=True, help="refusal | regex:PATTERN")
@click.option("--first-token", default=default_of(SweepConfig, "first_token"), show_default=True,
              help="Token whose exact next-token probability is reported.")
@click.option("--continuation", default=None, help="Text whose exact log-probability after each prompt is reported.")
@click.option("--logit-diff", nargs=2, default=None, metavar="A B", help="Report logit(A) - logit(B) after each prompt.")
@click.option("--graph", "graph_path", default=None, type=click.Path(dir_okay=False),
              help="Graph JSON whose node ids and supernodes --zero/--scale/--set name (as in intervene).")
@click.option("--scale", "scales", multiple=True, metavar="TARGET=FACTOR", help="Sample with activations scaled.")
@click.option("--set", "sets", multiple=True, metavar="TARGET=VALUE", help="Sample with activations set.")
@click.option("--zero", "zeros", multiple=True, metavar="TARGET", help="Sample with activations zeroed.")
@click.option("--inject", "injections", multiple=True, metavar="LAYER/FEATURE@POS=VALUE", help="Sample with a feature added.")
@click.option("--freeze-attention/--no-freeze-attention", default=True, show_default=True,
              help="Replay the clean attention patterns on the prompt pass (with interventions).")
@click.option("--transcoders", "transcoders_name", default=None, help="Default: the graph's set, else the model's.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="Draw the rates to a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@placement_options()
def sweep(placement, prompts, prompts_file, chat, system, assistant_prefix, model_name, samples, max_new_tokens, temperature, seed,
          batch_size, classifier, first_token, continuation, logit_diff, graph_path, scales, sets, zeros, injections,
          freeze_attention, transcoders_name, plot_path, as_json):
    """Sample continuations of each prompt, classify them and report rates with 95 % intervals;
    with --zero/--scale/--set/--inject, under those interventions on the real model."""
    cfg = SweepConfig(samples=samples, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                      batch_size=batch_size, classifier=classifier, first_token=first_token, continuation=continuation,
                      logit_diff=tuple(logit_diff) if logit_diff else None)
    if prompts_file is not None:
        if prompts:
            raise BadInputError("give prompts either as arguments or with --prompts FILE, not both")
        prompts = _read_prompts(prompts_file)
    if not prompts:
        raise BadInputError("give at least one PROMPT (or --prompts FILE.jsonl)")
    request = ChatRequest(chat, system, assistant_prefix, None)
    for prompt in prompts:
        request.check(prompt)
    interventions, graph_data = _interventions(graph_path, scales, sets, zeros, injections)

    from mechscope import distributed
    from mechscope.interventions.sweep import run_sweep

    from mechscope.progress import Progress

    distributed.init()  # under torchrun: join the process group; prompts are split across ranks
    progress = Progress.for_terminal(quiet=as_json or not distributed.is_main())
    if model_name is None:
        from mechscope.models.loading import model_name_for

        model_name = model_name_for(graph_data["metadata"]["model_id"]) if graph_data and graph_data["metadata"].get(
            "model_id") else "gemma-3-270m"
    progress.phase(f"loading {model_name}")
    model = placement.load_model(model_name)
    texts = [request.render(model.tokenizer, p)[0] for p in prompts]
    if graph_data is not None:  # node ids name positions of the graph's prompt: check each prompt against it
        from mechscope.cli.intervene import _check_prompt_matches_graph

        for text in texts:
            _check_prompt_matches_graph(model.token_strings(model.tokenize(text)),
                                        graph_data["metadata"]["prompt_tokens"], interventions, {})
    rm = config = None
    if interventions:
        from mechscope.interventions.intervene import InterventionConfig
        from mechscope.replacement.replacement_model import ReplacementModel
        from mechscope.transcoders.io import default_transcoders_for, load_transcoder_set

        name = transcoders_name or (graph_data["metadata"]["scan"] if graph_data else default_transcoders_for(model.name))
        rm = ReplacementModel(model, load_transcoder_set(name))
        config = InterventionConfig(freeze_attention=freeze_attention)
    result = run_sweep(model, texts, cfg, labels=list(prompts), progress=progress, rm=rm, interventions=interventions,
                       intervention_config=config)
    if not distributed.is_main():  # rank 0 reports
        return
    if plot_path:
        _plot(result, Path(plot_path))
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    echo = click.echo
    echo(f"{cfg.classifier} rate over {cfg.samples} samples per prompt (temperature {cfg.temperature:g}, "
         f"{cfg.max_new_tokens} new tokens, seed {cfg.seed}); p = exact probability of first token {cfg.first_token!r}")
    for r in result.prompts:
        logprob = "" if r.logprob_continuation is None else f"  log p(continuation) {r.logprob_continuation:.3f}"
        if r.logit_diff is not None:
            logprob += f"  logit diff {r.logit_diff:+.3f}"
        echo(f"  {r.rate:6.1%} ({r.count}/{r.n}, 95% CI {r.ci[0]:.1%}-{r.ci[1]:.1%})  p={r.p_first_token:.3f}"
             f"{logprob}  {r.prompt!r}")
    for c in result.comparisons:
        echo(f"  vs the first: {c.difference:+.1%} (95% CI {c.ci[0]:+.1%} to {c.ci[1]:+.1%}, Fisher p = {c.p_value:.3g})"
             f"  {c.prompt!r}")
    if plot_path:
        echo(f"plot written to {plot_path}")
