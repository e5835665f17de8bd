"""``mechscope dream LAYER/INDEX``: fluent dreaming (EPO) — fluent prompts that drive a feature,
as a Pareto frontier of activation against self cross-entropy, relative to the dashboard maximum."""

from __future__ import annotations

import json

import click

from mechscope.cli.options import default_of, placement_options
from mechscope.cli.chat_options import chat_options
from mechscope.errors import BadInputError, CorruptFileError
from mechscope.features.dream import DreamConfig, DreamResult, dream_feature

__all__ = ["dream"]


def _dashboard_max(store: str | None, transcoders_name: str, layer: int, index: int) -> tuple[float | None, str]:
    """The feature's dashboard maximum, or ``None`` and why not. A store named with ``--store``
    must be readable; the default one may be missing or mid-rebuild (then % of max is unavailable)."""
    from mechscope.cli.features import _store_path
    from mechscope.features.store import FeatureStore

    path = _store_path(store, transcoders_name)
    if store is None and not path.exists():
        return None, f"no feature store at {str(path)!r}"
    try:
        return FeatureStore(path).feature(layer, index).max_value, ""
    except CorruptFileError as e:
        if store is not None:
            raise
        return None, str(e)


def _rows(result: DreamResult, dashboard_max: float | None) -> list[dict]:
    rows = []
    for p in result.frontier:
        percent = 100.0 * p.activation / dashboard_max if dashboard_max else None
        rows.append({"text": p.text, "tokens": list(p.tokens), "token_ids": list(p.token_ids),
                     "activation": p.activation, "percent_of_max": percent, "xent": p.xent,
                     "exceeds_dashboard_max": dashboard_max is not None and p.activation > dashboard_max})
    return rows


def _print_table(result: DreamResult, rows: list[dict], dashboard_max: float | None, why: str) -> None:
    echo = click.echo
    best = max(result.history)
    echo(f"feature {result.layer}/{result.feature}: start activation {result.start_activation:.3f}, best {best:.3f} "
         f"after {len(result.history)} iterations (penalties {result.penalties[0]:g} .. {result.penalties[-1]:g})")
    if dashboard_max is None:
        echo(f"% of the dashboard max is unavailable: {why} (build one with `mechscope features build`)")
    elif dashboard_max > 0:
        echo(f"dashboard max {dashboard_max:.3f}; best is {100.0 * best / dashboard_max:.1f}% of it")
    else:
        echo("the feature never fired on the dashboard corpus (max 0)")
    echo("Pareto frontier (activation up, self cross-entropy down):")
    echo(f"  {'activation':>10} {'% of max':>9} {'xent':>6}  prompt")
    for row in rows:
        pct = f"{row['percent_of_max']:8.1f}%" if row["percent_of_max"] is not None else f"{'-':>9}"
        flag = "  > max" if row["exceeds_dashboard_max"] else ""
        echo(f"  {row['activation']:10.3f} {pct} {row['xent']:6.2f}  {row['text']!r}{flag}")
    above = sum(row["exceeds_dashboard_max"] for row in rows)
    if above:
        echo(f"{above} prompt(s) exceed the dashboard maximum: its corpus missed where this feature fires hardest")


@click.command()
@click.argument("feature_id")
@click.option("--iters", "n_iters", type=int, default=100, show_default=True,
              help="EPO iterations (about 3 s each for Gemma 3 270M on 2 CPU cores; EPO's own default is 300).")
@click.option("--seed", type=int, default=default_of(DreamConfig, "seed"), show_default=True)
@click.option("--length", "seq_len", type=int, default=default_of(DreamConfig, "seq_len"), show_default=True,
              help="Prompt tokens, BOS included.")
@click.option("--population", type=int, default=default_of(DreamConfig, "population"), show_default=True,
              help="Members, one per fluency penalty (log-spaced 0.1 .. 10).")
@click.option("--top-k", type=int, default=default_of(DreamConfig, "top_k"), show_default=True,
              help="Candidate tokens per position, by gradient score.")
@click.option("--start", default=None, help="Start every member from this prompt (default: random tokens); "
              "with --chat, the prompt is a user turn rendered with the model's chat template.")
@click.option("--transcoders", "transcoders_name", default=None,
              help="Shipped set name or set directory (default: the shipped set for the model).")
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True)
@click.option("--store", default=None, help="Feature store for % of the dashboard max (default: the set's store).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@placement_options()
@chat_options
def dream(placement, feature_id, n_iters, seed, seq_len, population, top_k, start, chat_request, transcoders_name, model_name,
          store, as_json):
    """Optimise fluent prompts that activate FEATURE_ID (LAYER/INDEX); print their Pareto frontier."""
    from mechscope.features.store import parse_feature_id
    from mechscope.models.loading import HF_IDS
    from mechscope.transcoders.io import default_transcoders_for

    layer, index = parse_feature_id(feature_id)
    if chat_request.active:
        if chat_request.messages_file is None and start is None:
            raise BadInputError("--chat needs --start TEXT (the user turn to start from)")
        chat_request.check(start if chat_request.messages_file is None else None)
    if transcoders_name is None:
        transcoders_name = default_transcoders_for(HF_IDS.get(model_name, model_name))
    config = DreamConfig(n_iters=n_iters, seq_len=seq_len, population=population, top_k=top_k, seed=seed)
    dashboard_max, why = _dashboard_max(store, transcoders_name, layer, index)

    from mechscope.replacement.replacement_model import ReplacementModel
    from mechscope.transcoders.io import load_transcoder_set

    model = placement.load_model(model_name)
    if chat_request.active:
        start = chat_request.render(model.tokenizer, start)[0]
    rm = ReplacementModel(model, load_transcoder_set(transcoders_name))
    result = dream_feature(rm, layer, index, start=start, progress=not as_json, config=config)
    rows = _rows(result, dashboard_max)
    if as_json:
        click.echo(json.dumps({"feature": f"{layer}/{index}", "dashboard_max": dashboard_max,
                               "start_activation": result.start_activation, "penalties": result.penalties,
                               "frontier": rows, "history": result.history}))
        return
    _print_table(result, rows, dashboard_max, why)
