"""``mechscope probe LAYER/INDEX PROMPT...``: a feature's activation on new prompts, as % of its dashboard max."""

from __future__ import annotations

import json

import click

from mechscope.cli.chat_options import chat_options
from mechscope.cli.options import placement_options
from mechscope.errors import BadInputError

__all__ = ["probe"]


@click.command()
@click.argument("feature_id")
@click.argument("prompts", nargs=-1)
@click.option("--transcoders", "transcoders_name", default=None,
              help="Shipped set name or set directory (default: the shipped set for the model).")
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True)
@click.option("--store", default=None, help="Feature store (default: <cache>/features/<set>.sqlite).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
@placement_options()
@chat_options
def probe(feature_id, prompts, chat_request, placement, transcoders_name, model_name, store, as_json):
    """Maximum activation of FEATURE_ID on each PROMPT as % of the dashboard maximum
    (with --chat, each PROMPT is a user turn rendered with the model's chat template)."""
    from mechscope.cli.features import _store_path
    from mechscope.features.store import FeatureStore, parse_feature_id
    from mechscope.models.loading import HF_IDS
    from mechscope.transcoders.io import default_transcoders_for

    layer, index = parse_feature_id(feature_id)
    if chat_request.messages_file is not None:
        chat_request.check(None)
        prompts = (None,)
    elif not prompts:
        raise BadInputError("give at least one PROMPT to probe (or --messages FILE.json)")
    for p in prompts if prompts != (None,) else ():
        chat_request.check(p)
    if transcoders_name is None:
        transcoders_name = default_transcoders_for(HF_IDS.get(model_name, model_name))
    dashboard = FeatureStore(_store_path(store, transcoders_name)).feature(layer, index)

    from mechscope.features.probe import probe_feature

    from mechscope.replacement.replacement_model import ReplacementModel
    from mechscope.transcoders.io import load_transcoder_set

    from mechscope.progress import Progress

    progress = Progress.for_terminal(quiet=as_json)
    progress.phase(f"loading {model_name} and {transcoders_name}")
    model = placement.load_model(model_name)
    texts = [chat_request.render(model.tokenizer, p)[0] for p in prompts]
    progress.phase(f"{len(texts)} prompt(s) through layer {layer}")
    rm = ReplacementModel(model, load_transcoder_set(transcoders_name))
    results = probe_feature(rm, layer, index, texts, dashboard.max_value)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results]))
        return
    click.echo(f"feature {layer}/{index}: dashboard max {dashboard.max_value:.3f}")
    for r in results:
        if r.active:
            click.echo(f"  {r.percent_of_max:7.1f}%  {r.max_activation:8.3f}  at {r.token!r} (pos {r.position})  {r.prompt!r}")
        else:
            click.echo(f"  {'inactive':>8}  {'':>8}  closest at {r.token!r} (pos {r.position}, pre-activation "
                       f"{r.pre_activation:.3f})  {r.prompt!r}")
