"""``mechscope features build|show|label``: feature dashboards from a diverse corpus.

The store of a transcoder set lives at ``<cache>/features/<set>.sqlite`` unless ``--store`` says
otherwise; it is built by ``features build`` and never committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mechscope.cli.options import placement_options
from mechscope.errors import BadInputError

__all__ = ["features"]


def _store_path(store: str | None, transcoders: str) -> Path:
    from mechscope.paths import cache_root

    return Path(store) if store else cache_root() / "features" / f"{Path(transcoders).name}.sqlite"


@click.group()
def features() -> None:
    """Build and read feature dashboards."""


@features.command("build")
@click.option("--transcoders", "transcoders_name", default="gemma-3-270m-plt-v1", show_default=True)
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True)
@click.option("--corpus", "corpus_path", default=None,
              help="Built corpus: a name under <cache>/corpus (e.g. chat-qwen2.5-coder-0.5b-instruct) or a directory "
                   "(default: the default corpus).")
@click.option("--tokens", "n_tokens", type=int, default=1_000_000, show_default=True, help="Tokens to stream.")
@click.option("--ctx-len", type=int, default=128, show_default=True)
@click.option("--batch-sequences", type=int, default=8, show_default=True)
@click.option("--quantile-tokens", type=int, default=262_144, show_default=True,
              help="Tokens of the second pass that samples examples across activation intervals.")
@click.option("--mix", type=click.Choice(["source", "document"]), default="document", show_default=True,
              help="source: each context is one window of one source; document: contexts packed with pieces of "
                   "documents from all sources.")
@click.option("--seed", type=int, default=1, show_default=True, help="Order of the corpus sequences.")
@click.option("--store", default=None, help="Output file (default: <cache>/features/<set>.sqlite).")
@click.option("--checkpoint-dir", default=None, help="Resumable state (default: <cache>/features/<set>.build).")
@click.option("--no-progress", is_flag=True)
@placement_options()
def build_command(placement, transcoders_name, model_name, corpus_path, n_tokens, ctx_len, batch_sequences, quantile_tokens, mix,
                  seed, store, checkpoint_dir, no_progress):
    """Stream the corpus through the model and record every feature's dashboard (resumable)."""
    if n_tokens < 1:
        raise BadInputError(f"--tokens must be >= 1, got {n_tokens}")
    if quantile_tokens < 0:
        raise BadInputError(f"--quantile-tokens must be >= 0, got {quantile_tokens}")
    from mechscope import distributed
    from mechscope.data.corpus import TokenStream, resolve_corpus
    from mechscope.features.build import build_feature_store
    from mechscope.progress import Progress
    from mechscope.replacement.replacement_model import ReplacementModel
    from mechscope.transcoders.io import load_transcoder_set, resolve_transcoders

    resolve_transcoders(transcoders_name)
    distributed.init()
    progress = Progress.for_terminal(quiet=no_progress or not distributed.is_main())
    out = _store_path(store, transcoders_name)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out.with_suffix(".build")
    progress.phase(f"loading {model_name} and {transcoders_name}")
    model = placement.load_model(model_name)
    rm = ReplacementModel(model, load_transcoder_set(transcoders_name))
    progress.phase("tokenizing the corpus (once per tokenizer; cached)")
    stream = TokenStream(resolve_corpus(corpus_path), model.tokenizer, ctx_len, "train", seed, mix=mix)
    path = build_feature_store(rm, stream, n_tokens, out, ckpt, batch_sequences, quantile_tokens=quantile_tokens,
                               progress=progress)
    if distributed.is_main():
        click.echo(f"feature store written to {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _highlight(tokens: list[str], acts: list[float], max_value: float) -> str:
    parts = []
    for token, act in zip(tokens, acts):
        text = token.replace("\n", "\\n")
        if act > 0:
            strength = min(act / max_value, 1.0) if max_value > 0 else 0.0
            parts.append(click.style(text, bold=strength > 0.5, fg="red" if strength > 0.5 else "yellow"))
        else:
            parts.append(text)
    return "".join(parts)


@features.command("show")
@click.argument("feature_id")
@click.option("--transcoders", "transcoders_name", default="gemma-3-270m-plt-v1", show_default=True)
@click.option("--store", default=None, help="Store file (default: <cache>/features/<set>.sqlite).")
@click.option("--top", type=int, default=10, show_default=True, help="Top contexts to print.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the dashboard as a standalone HTML page.")
@click.option("--json", "as_json", is_flag=True)
def show(feature_id, transcoders_name, store, top, html_path, as_json):
    """Print the dashboard of FEATURE_ID (LAYER/INDEX)."""
    from dataclasses import asdict

    from mechscope.features.store import FeatureStore, parse_feature_id

    layer, index = parse_feature_id(feature_id)
    feature_store = FeatureStore(_store_path(store, transcoders_name))
    dash = feature_store.feature(layer, index)
    if html_path:
        from mechscope.features.export import dashboard_html
        from mechscope.paths import atomic_write_text

        atomic_write_text(Path(html_path), dashboard_html(dash, feature_store.meta))
    if as_json:
        click.echo(json.dumps(asdict(dash)))
        return
    echo = click.echo
    echo(f"feature {layer}/{index}" + (f"  \"{dash.label}\"" if dash.label else ""))
    echo(f"density {dash.density:.2e} ({dash.active} active tokens), max activation {dash.max_value:.3f}")
    echo("promotes:  " + "  ".join(f"{t!r} {v:+.2f}" for t, v in dash.pos_tokens))
    echo("suppresses: " + "  ".join(f"{t!r} {v:+.2f}" for t, v in dash.neg_tokens))
    echo("top activations:")
    for example in dash.top[:top]:
        echo(f"  {example.value:7.3f}  {_highlight(example.tokens, example.acts, dash.max_value)}")
    for interval in dash.quantiles:
        echo(f"interval {interval.index}: activation in ({interval.low:.3f}, {interval.high:.3f}]")
        for example in interval.examples:
            echo(f"  {example.value:7.3f}  {_highlight(example.tokens, example.acts, dash.max_value)}")
    if html_path:
        echo(f"HTML dashboard written to {html_path}")


@features.command("export")
@click.argument("feature_ids", nargs=-1)
@click.option("--all", "export_all", is_flag=True, help="Every feature that fired on the corpus.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="features", show_default=True)
@click.option("--transcoders", "transcoders_name", default="gemma-3-270m-plt-v1", show_default=True)
@click.option("--store", default=None, help="Store file (default: <cache>/features/<set>.sqlite).")
def export(feature_ids, export_all, out_dir, transcoders_name, store):
    """Write Neuronpedia feature JSON (OUT/<set>/<cantor(layer, index)>.json) for FEATURE_IDS or --all."""
    from mechscope.features.export import write_neuronpedia_features
    from mechscope.features.store import FeatureStore, parse_feature_id

    if bool(feature_ids) == export_all:
        raise BadInputError("give feature ids (LAYER/INDEX ...) or --all, not both or neither")
    ids = None if export_all else [parse_feature_id(f) for f in feature_ids]
    paths = write_neuronpedia_features(FeatureStore(_store_path(store, transcoders_name)), out_dir, ids)
    click.echo(f"{len(paths)} feature files written under {Path(out_dir).resolve()}")


@features.command("label")
@click.argument("feature_id")
@click.argument("text")
@click.option("--transcoders", "transcoders_name", default="gemma-3-270m-plt-v1", show_default=True)
@click.option("--store", default=None, help="Store file (default: <cache>/features/<set>.sqlite).")
def label(feature_id, text, transcoders_name, store):
    """Give FEATURE_ID (LAYER/INDEX) a human label (used as clerp in graph exports)."""
    from mechscope.features.store import FeatureStore, parse_feature_id

    layer, index = parse_feature_id(feature_id)
    FeatureStore(_store_path(store, transcoders_name)).set_label(layer, index, text)
    click.echo(f"label of {layer}/{index} set")
