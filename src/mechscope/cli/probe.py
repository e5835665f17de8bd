"""``mechscope probe LAYER/INDEX PROMPT...``: a feature's activation on new prompts, as % of its dashboard max."""

from __future__ import annotations

import json

import click

from mechscope.errors import BadInputError

__all__ = ["probe"]


@click.command()
@click.argument("feature_id")
@click.argument("prompts", nargs=-1, required=True)
@click.option("--transcoders", "transcoders_name", default="gemma-3-270m-plt-v1", show_default=True)
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True)
@click.option("--store", default=None, help="Feature store (default: <cache>/features/<set>.sqlite).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
def probe(feature_id, prompts, transcoders_name, model_name, store, as_json):
    """Maximum activation of FEATURE_ID on each PROMPT as % of the dashboard maximum."""
    from mechscope.cli.features import _store_path
    from mechscope.features.store import FeatureStore, parse_feature_id

    layer, index = parse_feature_id(feature_id)
    if any(not p.strip() for p in prompts):
        raise BadInputError("a prompt is empty; give some text to probe")
    dashboard = FeatureStore(_store_path(store, transcoders_name)).feature(layer, index)

    from mechscope.features.probe import probe_feature
    from mechscope.models.loading import load_model
    from mechscope.replacement.replacement_model import ReplacementModel
    from mechscope.transcoders.io import load_transcoder_set

    rm = ReplacementModel(load_model(model_name), load_transcoder_set(transcoders_name))
    results = probe_feature(rm, layer, index, list(prompts), dashboard.max_value)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results]))
        return
    click.echo(f"feature {layer}/{index}: dashboard max {dashboard.max_value:.3f}")
    for r in results:
        click.echo(f"  {r.percent_of_max:7.1f}%  {r.max_activation:8.3f}  at {r.token!r} (pos {r.position})  {r.prompt!r}")
