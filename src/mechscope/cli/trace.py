"""``mechscope trace PROMPT``: attribution graph of a prompt, pruned, scored and exported.

Writes ``OUT/<slug>.json`` (Neuronpedia exchange format) and ``OUT/<slug>/`` (internal graph:
``graph.json`` + ``graph.safetensors``). All inputs are checked before anything is written, and
each file is written atomically, so a failed run leaves no partial output.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click

from mechscope.attribution.attribute import AttributionConfig
from mechscope.cli.chat_options import chat_options
from mechscope.cli.options import CountOrAll, default_of, placement_options
from mechscope.errors import BadInputError
from mechscope.memory import peak_rss_mb

__all__ = ["trace"]


@click.command()
@click.argument("prompt", required=False)
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help="Many graphs: a JSONL file, one object a line with \"prompt\" and optional \"chat\" "
                   "(true: render as the user turn), \"target\" (a token or a list) and \"slug\". Under "
                   "torchrun the prompts are split across ranks.")
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True,
              help="Offline name, model directory, .gguf file or Hugging Face id.")
@click.option("--transcoders", "transcoders_name", default=None,
              help="Shipped set name, set directory or Hugging Face id (default: the shipped set for the model).")
@click.option("--target", "targets", multiple=True, help="Explain this token's logit (repeatable).")
@click.option("--logit-diff", nargs=2, default=None, metavar="A B",
              help="Explain one target: the logit of token A minus that of token B (e.g. \"I\" \"Sure\").")
@click.option("--max-feature-nodes", type=CountOrAll(), default=default_of(AttributionConfig, "max_feature_nodes"),
              show_default=True, help="Feature nodes kept, chosen by influence; 'all' keeps every active feature.")
@click.option("--node-threshold", type=float, default=0.8, show_default=True)
@click.option("--edge-threshold", type=float, default=0.98, show_default=True)
@click.option("--batch-size", type=int, default=default_of(AttributionConfig, "batch_size"), show_default=True)
@click.option("--max-n-logits", type=int, default=default_of(AttributionConfig, "max_n_logits"), show_default=True)
@click.option("--desired-logit-prob", type=float, default=default_of(AttributionConfig, "desired_logit_prob"),
              show_default=True)
@placement_options("Model weights and the frozen backward passes; bfloat16 is faster and lighter but not exact "
                   "(edges, influence and pruning stay float32).")
@click.option("--max-prompt-tokens", type=int, default=1024, show_default=True)
@click.option("--edge-rows-gb", type=float, default=None,
              help="Gigabytes the edge rows may take in float32; past it they are held in float16 (half the "
                   "memory, edges rounded to 11 significant bits). Default: 60 percent of the memory available.")
@click.option("--no-prune", is_flag=True, help="Export every node and every non-zero edge.")
@click.option("--full-graph", is_flag=True,
              help="Keep every non-zero edge in DIR/<slug>/graph.safetensors (default: the pruned graph's edges).")
@click.option("--store", default=None,
              help="Feature store whose labels (clerp) and densities go into the graph (default: the set's store, "
                   "when built).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="graphs", show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object instead of the summary (one a line with --prompts).")
@chat_options
def trace(prompt, prompts_file, chat_request, model_name, transcoders_name, targets, logit_diff, max_feature_nodes,
          node_threshold, edge_threshold, batch_size, max_n_logits, desired_logit_prob, placement, max_prompt_tokens,
          edge_rows_gb, no_prune, full_graph, store, out_dir, as_json):
    """Trace PROMPT: build, prune and export its attribution graph (or one graph per line of --prompts)."""
    started = time.perf_counter()
    jobs = None
    if prompts_file is not None:
        if prompt is not None or chat_request.active:
            raise BadInputError("--prompts FILE takes the prompts (and their chat flags) from the file; "
                                "leave out PROMPT, --chat and --messages")
        jobs = read_prompts_file(prompts_file)
    else:
        chat_request.check(prompt)
    for name, value in (("--node-threshold", node_threshold), ("--edge-threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise BadInputError(f"{name} must be between 0 and 1, got {value}")
    if edge_rows_gb is not None and not edge_rows_gb > 0:
        raise BadInputError(f"--edge-rows-gb must be > 0 (gigabytes), got {edge_rows_gb}")
    config = AttributionConfig(max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob,
                               targets=tuple(targets), batch_size=batch_size,
                               logit_diff=tuple(logit_diff) if logit_diff else None,
                               max_feature_nodes=max_feature_nodes, edge_rows_gb=edge_rows_gb)
    if max_prompt_tokens < 1:
        raise BadInputError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")

    from mechscope import distributed
    from mechscope.replacement.replacement_model import ReplacementModel
    from mechscope.transcoders.io import default_transcoders_for, load_transcoder_set, resolve_transcoders

    if transcoders_name is not None:
        resolve_transcoders(transcoders_name)  # fail on a bad name before loading the model
    from mechscope.progress import Progress

    distributed.init()
    progress = Progress.for_terminal(quiet=as_json or not distributed.is_main())
    progress.phase(f"loading {model_name}")
    model = placement.load_model(model_name)
    transcoders_name = transcoders_name or default_transcoders_for(model.name)
    progress.phase(f"loading transcoders {transcoders_name}")
    transcoders = load_transcoder_set(transcoders_name)
    rm = ReplacementModel(model, transcoders, max_prompt_tokens=max_prompt_tokens)
    annotations = _store_annotations(store, transcoders_name, transcoders.scan)
    options = _GraphOptions(Path(out_dir), node_threshold, edge_threshold, no_prune, full_graph, annotations)
    if jobs is None:
        text, chat = chat_request.render(model.tokenizer, prompt)
        rm.tokenize(text)  # length check before the expensive part
        summary, graph, pruned = _trace_one(rm, text, chat, config, options, None, progress, started,
                                            release_tokenizer=True)
        if as_json:
            click.echo(json.dumps(summary))
        else:
            _print_summary(summary, graph, pruned)
        return
    rendered = []
    from mechscope.attribution.targets import target_token_ids

    for number, job in enumerate(jobs, 1):  # every prompt is rendered and checked before the first graph
        try:
            text, chat = _render_job(model.tokenizer, job)
            rm.tokenize(text)
            target_token_ids(model.tokenizer, job.get("target", ()))
        except BadInputError as e:
            raise BadInputError(f"--prompts {prompts_file}, prompt {number}: {e}") from e
        rendered.append((text, chat))
    _check_slugs(jobs, rendered)
    mine = []
    for i in distributed.shard(len(jobs)):
        job, (text, chat) = jobs[i], rendered[i]
        job_config = config if "target" not in job else replace(config, targets=tuple(job["target"]), logit_diff=None)
        summary, _, _ = _trace_one(rm, text, chat, job_config, options, job.get("slug"), progress, time.perf_counter())
        mine.append(summary)
        if not as_json:
            click.echo(f"[{i + 1}/{len(jobs)}] {summary['graph_path']}: top {summary['logit_targets'][0]['token']!r}, "
                       f"replacement {summary['replacement_score']:.3f}, {summary['attribution_seconds']:.1f}s")
    summaries = distributed.gather_in_order(len(jobs), mine)
    if as_json and distributed.is_main():
        for summary in summaries:
            click.echo(json.dumps(summary))


@dataclass(frozen=True)
class _GraphOptions:
    out: Path
    node_threshold: float
    edge_threshold: float
    no_prune: bool
    full_graph: bool
    annotations: tuple


def _trace_one(rm, text: str, chat, config: AttributionConfig, options: _GraphOptions, slug: str | None,
               progress, started: float, release_tokenizer: bool = False) -> tuple[dict, object, object]:
    """Build, prune, score and write one graph (atomically): ``(summary, graph, pruned graph or None)``;
    ``release_tokenizer``: a one-prompt command, whose tokenizer can go once the prompt's strings
    are decoded."""
    import torch

    from mechscope.attribution.attribute import attribute
    from mechscope.export.neuronpedia import to_neuronpedia, validate_neuronpedia
    from mechscope.graph.io import save_graph
    from mechscope.graph.prune import graph_scores, prune_graph
    from mechscope.models.chat import chat_metadata
    from mechscope.paths import atomic_write_text

    model = rm.model
    chat_record = None if chat is None else chat_metadata(model.tokenizer, chat, rm.tokenize(text))
    attribution_start = time.perf_counter()
    graph = attribute(rm, text, config, progress=progress, release_tokenizer=release_tokenizer)
    attribution_seconds = time.perf_counter() - attribution_start
    if chat_record is not None:
        graph.config["chat"] = chat_record
    # attribute() has released the weights' pages: pruning, scores and export do not read the model
    progress.phase("pruning and scores" if not options.no_prune else "scores")
    pruned = None if options.no_prune else prune_graph(graph, options.node_threshold, options.edge_threshold)
    replacement_score, completeness_score = graph_scores(graph)
    slug = _slug(text, chat, slug)
    labels, densities = options.annotations
    progress.phase("exporting the graph JSON")
    exchange = to_neuronpedia(graph, pruned, slug, options.node_threshold, options.edge_threshold, labels=labels,
                              densities=densities)
    validate_neuronpedia(exchange)
    graph_path = options.out / f"{slug}.json"
    save_graph(graph, options.out / slug, None if options.full_graph else pruned,
               (options.node_threshold, options.edge_threshold))
    atomic_write_text(graph_path, json.dumps(exchange))

    n_edges = int(torch.count_nonzero(graph.adjacency))  # (A != 0).sum() would cast N x N bools to int64
    summary = {
        "graph_path": str(graph_path),
        "slug": slug,
        "model": graph.model_id,
        "transcoders": graph.transcoder_set,
        "prompt_tokens": graph.input_tokens,
        "logit_targets": [
            {"token": t, "token_id": int(i), "prob": float(p)}
            for t, i, p in zip(graph.logit_tokens, graph.logit_token_ids, graph.logit_probabilities)
        ],
        "n_nodes": graph.n_nodes,
        "n_edges": n_edges,
        "n_nodes_pruned": len(exchange["nodes"]),
        "n_edges_pruned": len(exchange["links"]),
        "replacement_score": replacement_score,
        "completeness_score": completeness_score,
        "seconds": time.perf_counter() - started,
        "attribution_seconds": attribution_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }
    return summary, graph, pruned


def _slug(text: str, chat, given: str | None = None) -> str:
    """A graph's file name: the one given, else the user's words (a chat prompt's) or the text, slugified."""
    from mechscope.export.neuronpedia import slugify
    from mechscope.models.chat import chat_slug_text

    return given or slugify(chat_slug_text(chat) if chat is not None else text)


_JOB_KEYS = {"prompt", "chat", "target", "slug"}


def read_prompts_file(path: str) -> list[dict]:
    """The jobs of a ``--prompts`` JSONL file: per line ``{"prompt": str, "chat": bool, "target": str |
    [str], "slug": str}`` (only ``prompt`` required; blank lines skipped). ``target`` is returned as a
    list.

    Raises:
        BadInputError: a missing or unreadable file, a line that is not a JSON object, an unknown key,
            a value of the wrong type, or no prompts at all (the message names the line).
    """
    import re

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BadInputError(f"cannot read --prompts file {path!r}: {e.strerror or e}") from e
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInputError(f"{where} is not JSON ({e.msg}); write one object a line") from e
        if not isinstance(job, dict):
            raise BadInputError(f"{where} is not a JSON object; write {{\"prompt\": ...}} a line")
        unknown = sorted(set(job) - _JOB_KEYS)
        if unknown:
            raise BadInputError(f"{where} has unknown key(s) {unknown}; the keys are {sorted(_JOB_KEYS)}")
        if not isinstance(job.get("prompt"), str) or not job["prompt"].strip():
            raise BadInputError(f"{where} needs a non-empty string \"prompt\"")
        if not isinstance(job.get("chat", False), bool):
            raise BadInputError(f"{where}: \"chat\" must be true or false, got {job['chat']!r}")
        if "target" in job:
            target = job["target"]
            target = [target] if isinstance(target, str) else target
            if not isinstance(target, list) or not target or not all(isinstance(t, str) and t for t in target):
                raise BadInputError(f"{where}: \"target\" must be a token or a list of tokens, got {job['target']!r}")
            job["target"] = target
        if "slug" in job and (not isinstance(job["slug"], str) or not re.fullmatch(r"[A-Za-z0-9._-]+", job["slug"])
                              or job["slug"].startswith(".")):
            raise BadInputError(f"{where}: \"slug\" must be a file name of letters, digits, '.', '_' or '-', "
                                f"got {job['slug']!r}")
        jobs.append(job)
    if not jobs:
        raise BadInputError(f"--prompts file {path!r} holds no prompts")
    return jobs


def _render_job(tokenizer, job: dict):
    from mechscope.cli.chat_options import ChatRequest

    request = ChatRequest(bool(job.get("chat")), None, None, None)
    return request.render(tokenizer, job["prompt"])


def _check_slugs(jobs: list[dict], rendered: list) -> None:
    seen: dict[str, int] = {}
    for number, (job, (text, chat)) in enumerate(zip(jobs, rendered), 1):
        slug = _slug(text, chat, job.get("slug"))
        if slug in seen:
            raise BadInputError(f"prompts {seen[slug]} and {number} would both be written as {slug!r}; "
                                "give one of them a \"slug\"")
        seen[slug] = number


def _store_annotations(store: str | None, transcoders_name: str, scan: str):
    """Labels and densities from the feature store; none when no store was built (a named ``--store``
    must exist and match the transcoder set)."""
    from mechscope.cli.features import _store_path
    from mechscope.features.store import FeatureStore

    path = _store_path(store, transcoders_name)
    if store is None and not path.exists():
        return {}, None
    feature_store = FeatureStore(path)
    if feature_store.meta["transcoders"] != scan:
        raise BadInputError(f"feature store {str(path)!r} was built for transcoders {feature_store.meta['transcoders']!r},"
                            f" not {scan!r}")
    return feature_store.labels(), feature_store.density_table()


def command_name() -> str:
    """How to call mechscope again from here: ``mechscope`` when that is on PATH and is this one,
    else the path it was started by (``.venv/bin/mechscope`` after ``scripts/setup.sh``)."""
    import os
    import shutil

    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if started is None or started.name != "mechscope":
        return "mechscope"
    on_path = shutil.which("mechscope")
    if on_path and Path(on_path).resolve() == started.resolve():
        return "mechscope"
    try:
        relative = os.path.relpath(started)
    except ValueError:
        return str(started)
    return relative if not relative.startswith("..") else str(started)


def _print_summary(summary: dict, graph, pruned) -> None:
    echo = click.echo
    echo(f"prompt tokens: {summary['prompt_tokens']}")
    echo("top logits:")
    for t in summary["logit_targets"]:
        echo(f"  {t['token']!r:>16}  p={t['prob']:.3f}  (id {t['token_id']})")
    echo(f"nodes: {summary['n_nodes']} -> {summary['n_nodes_pruned']} after pruning; "
         f"edges: {summary['n_edges']} -> {summary['n_edges_pruned']}")
    echo(f"replacement score: {summary['replacement_score']:.3f}   "
         f"completeness score: {summary['completeness_score']:.3f}")
    if pruned is not None and graph.n_features:
        from mechscope.graph.effects import signed_effects

        scores = pruned.cumulative_scores[: graph.n_features]
        effects = signed_effects(graph)
        target = graph.logit_tokens[0]
        echo(f"most influential features (influence is unsigned; effects are signed, on {target!r}, in logit units):")
        echo(f"  {'node id':<14} {'layer/feature':<14} {'token':<14} {'act':>7} {'direct':>8} {'total':>8}")
        for node in scores.argsort()[:10].tolist():
            layer, pos, feature, act = graph.feature_of(node)
            echo(f"  {graph.node_id(node):<14} {f'{layer}/{feature}':<14} {graph.input_tokens[pos]!r:<14} {act:7.2f} "
                 f"{float(effects.direct[node, 0]):+8.3f} {float(effects.total[node, 0]):+8.3f}")
    echo(f"graph: {summary['graph_path']}  (explore it: {command_name()} serve {Path(summary['graph_path']).parent})")
    echo(f"wall time: {summary['seconds']:.1f}s (attribution {summary['attribution_seconds']:.1f}s), "
         f"peak RSS {summary['peak_rss_mb']:.0f} MB")
