"""``mechscope dense``: the most frequently active features, their decoder geometry and antipodal pairs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mechscope.errors import BadInputError

__all__ = ["dense"]


def _plot(path: Path, densities, cosines, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mechscope.cli.options import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    positive = densities[densities > 0]
    left.hist(np.log10(positive), bins=60, color="tab:blue")
    left.set_xlabel("log10 activation density")
    left.set_ylabel("features")
    left.set_title(f"density of {len(densities)} features ({len(densities) - len(positive)} never active)")
    image = right.imshow(cosines, vmin=-1, vmax=1, cmap="RdBu_r")
    right.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.set_title("decoder cosine similarity of the densest features")
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    save_figure(fig, path)


@click.command()
@click.option("--top", type=int, default=10, show_default=True, help="How many of the densest features.")
@click.option("--transcoders", "transcoders_name", default="gemma-3-270m-plt-v1", show_default=True)
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True)
@click.option("--store", default=None, help="Feature store (default: <cache>/features/<set>.sqlite).")
@click.option("--corpus", "corpus_path", default=None, help="Corpus for co-activation (default: the default corpus).")
@click.option("--coactivation-sequences", type=int, default=256, show_default=True,
              help="Sequences of the store's corpus stream on which co-activation is counted.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="Write a PNG.")
@click.option("--json", "as_json", is_flag=True)
def dense(top, transcoders_name, model_name, store, corpus_path, coactivation_sequences, plot_path, as_json):
    """List the densest features with examples; flag antipodal pairs (cosine < -0.9, never co-active)."""
    if top < 2:
        raise BadInputError(f"--top must be >= 2, got {top}")
    if coactivation_sequences < 1:
        raise BadInputError(f"--coactivation-sequences must be >= 1, got {coactivation_sequences}")
    from mechscope.cli.features import _store_path
    from mechscope.features.store import FeatureStore

    feature_store = FeatureStore(_store_path(store, transcoders_name))
    densest = feature_store.densest(top)

    import torch

    from mechscope.data.corpus import TokenStream, corpus_dir
    from mechscope.features.dense import antipodal_pairs, coactivation, decoder_cosines
    from mechscope.models.loading import load_model
    from mechscope.replacement.replacement_model import ReplacementModel
    from mechscope.transcoders.io import load_transcoder_set

    from mechscope.progress import Progress

    progress = Progress.for_terminal(quiet=as_json)
    progress.phase(f"loading {model_name} and {transcoders_name}")
    model = load_model(model_name)
    rm = ReplacementModel(model, load_transcoder_set(transcoders_name))
    ids = [(layer, feature) for layer, feature, _ in densest]
    cosines = decoder_cosines(rm.transcoders, ids)
    stream = TokenStream(Path(corpus_path) if corpus_path else corpus_dir(), model.tokenizer,
                         feature_store.meta["ctx_len"], "train", feature_store.meta["seed"], mix=feature_store.meta["mix"])
    progress.phase(f"co-activation of the {len(ids)} densest features on {coactivation_sequences} corpus sequences")
    coactive = coactivation(rm, stream, ids, coactivation_sequences, progress=progress)
    pairs = antipodal_pairs(cosines, coactive)
    rows = []
    for layer, feature, density in densest:
        dash = feature_store.feature(layer, feature)
        examples = ["".join(e.tokens) for e in dash.top[:3]]
        rows.append({"layer": layer, "feature": feature, "density": density, "max_value": dash.max_value,
                     "label": dash.label, "pos_tokens": dash.pos_tokens[:5], "examples": examples})
    names = [f"{r['layer']}/{r['feature']}" for r in rows]
    if plot_path:
        _plot(Path(plot_path), feature_store.densities(), cosines.numpy(), names)
    if as_json:
        click.echo(json.dumps({"features": rows, "cosines": cosines.tolist(), "coactive": coactive.tolist(),
                               "coactivation_tokens": coactivation_sequences * (stream.ctx_len - 1),
                               "antipodal_pairs": [{"a": names[a], "b": names[b], "cosine": c} for a, b, c in pairs]}))
        return
    n_dense = sum(d > 0.5 for d in feature_store.densities())
    click.echo(f"the {len(rows)} densest of {len(feature_store.densities()):,} features ({n_dense:,} active on more than "
               f"half of the store's {feature_store.meta['n_tokens']:,} tokens):")
    for r in rows:
        click.echo(f"{r['layer']:>2}/{r['feature']:<6} density {r['density']:.3f}  max {r['max_value']:.2f}  "
                   f"promotes {' '.join(repr(t) for t, _ in r['pos_tokens'][:3])}")
        for text in r["examples"][:2]:
            click.echo(f"           {text[-70:]!r}")
    off = cosines[~torch.eye(len(ids), dtype=torch.bool)]
    click.echo(f"decoder cosines between them: min {float(off.min()):.3f}, max {float(off.max()):.3f}")
    click.echo(f"antipodal pairs (cosine < -0.9, never co-active on {coactivation_sequences} sequences): "
               + (", ".join(f"{names[a]} & {names[b]} ({c:.2f})" for a, b, c in pairs) or "none"))
    if plot_path:
        click.echo(f"plot written to {plot_path}")
