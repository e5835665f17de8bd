"""``mechscope supernodes suggest|add|remove|show GRAPH.json``: group graph nodes.

Supernodes are stored in the graph JSON's ``qParams.supernodes`` (the file is rewritten
atomically, after validation), where Neuronpedia's graph explorer and ``mechscope intervene``
read them.
"""

from __future__ import annotations

import json

import click

from mechscope.errors import BadInputError

__all__ = ["supernodes"]


def _load(path: str) -> dict:
    from mechscope.export.neuronpedia import read_neuronpedia

    return read_neuronpedia(path)


def _save(data: dict, path: str) -> None:
    from mechscope.export.neuronpedia import write_neuronpedia

    write_neuronpedia(data, path)


@click.group()
def supernodes() -> None:
    """Create, suggest and view supernodes of a graph JSON."""


@supernodes.command("suggest")
@click.argument("graph_path", type=click.Path(dir_okay=False))
@click.option("--min-similarity", type=float, default=0.6, show_default=True,
              help="Merge features while their edge profiles' mean cosine similarity is at least this.")
@click.option("--min-size", type=int, default=2, show_default=True)
@click.option("--max-density", type=float, default=0.5, show_default=True,
              help="Leave out features active on more than this fraction of the store's tokens (nodes carry "
                   "density when the graph was traced with a feature store); 1 keeps all.")
@click.option("--accept", default=None, metavar="all|1,2,...", help="Write these suggestions into the graph.")
@click.option("--json", "as_json", is_flag=True)
def suggest(graph_path, min_similarity, min_size, max_density, accept, as_json):
    """Suggest supernodes from similar edge profiles; --accept writes chosen ones."""
    from mechscope.graph.supernodes import add_supernode, dense_feature_nodes, suggest_supernodes

    data = _load(graph_path)
    from mechscope.progress import Progress

    progress = Progress.for_terminal(quiet=as_json)
    n_features = sum(node["feature_type"] == "cross layer transcoder" for node in data["nodes"])
    progress.phase(f"average-linkage clustering of {n_features:,} feature nodes by edge profile "
                   f"({len(data['links']):,} edges)")
    suggestions = suggest_supernodes(data, min_similarity, min_size, max_density)
    progress.phase(f"{len(suggestions)} suggestions")
    dense = dense_feature_nodes(data, max_density)
    chosen: list[int] = []
    if accept is not None:
        if accept == "all":
            chosen = list(range(len(suggestions)))
        else:
            try:
                chosen = [int(i) - 1 for i in accept.split(",")]
            except ValueError:
                raise BadInputError(f"--accept expects 'all' or suggestion numbers like 1,3; got {accept!r}") from None
            bad = [i + 1 for i in chosen if not 0 <= i < len(suggestions)]
            if bad:
                raise BadInputError(f"--accept: no suggestion number {bad}; there are {len(suggestions)}")
        for i in chosen:
            add_supernode(data, suggestions[i], replace=True)
        _save(data, graph_path)
    if as_json:
        click.echo(json.dumps([{"number": n + 1, "label": s.label, "node_ids": list(s.node_ids), "score": s.score,
                                "accepted": n in chosen} for n, s in enumerate(suggestions)]))
        if dense:
            click.echo(f"left out {len(dense)} dense features (density > {max_density})", err=True)
        return
    for n, s in enumerate(suggestions):
        mark = "  (written)" if n in chosen else ""
        click.echo(f"{n + 1:>3}. {s.label}  [{len(s.node_ids)} nodes, similarity {s.score:.2f}]{mark}")
        click.echo(f"     {' '.join(s.node_ids)}")
    if not suggestions:
        click.echo("no groups at this similarity; try a lower --min-similarity")
    if dense:
        click.echo(f"left out {len(dense)} dense features (density > {max_density}): {' '.join(dense)}")


@supernodes.command("add")
@click.argument("graph_path", type=click.Path(dir_okay=False))
@click.argument("label")
@click.argument("node_ids", nargs=-1, required=True)
@click.option("--replace", is_flag=True, help="Replace a supernode with the same label.")
def add(graph_path, label, node_ids, replace):
    """Add supernode LABEL made of NODE_IDS."""
    from mechscope.graph.supernodes import Supernode, add_supernode

    data = _load(graph_path)
    add_supernode(data, Supernode(label, tuple(node_ids)), replace=replace)
    _save(data, graph_path)
    click.echo(f"supernode {label!r} ({len(node_ids)} nodes) written to {graph_path}")


@supernodes.command("remove")
@click.argument("graph_path", type=click.Path(dir_okay=False))
@click.argument("label")
def remove(graph_path, label):
    """Remove supernode LABEL."""
    from mechscope.graph.supernodes import remove_supernode

    data = _load(graph_path)
    remove_supernode(data, label)
    _save(data, graph_path)
    click.echo(f"supernode {label!r} removed from {graph_path}")


@supernodes.command("show")
@click.argument("graph_path", type=click.Path(dir_okay=False))
@click.option("--top", type=int, default=20, show_default=True, help="Strongest grouped edges to print.")
@click.option("--json", "as_json", is_flag=True)
def show(graph_path, top, as_json):
    """Print the supernodes and the strongest edges between groups."""
    from mechscope.graph.supernodes import read_supernodes, supernode_view

    data = _load(graph_path)
    view = supernode_view(data)
    edges = view.edges(top)
    if as_json:
        click.echo(json.dumps({"supernodes": [s.as_list() for s in read_supernodes(data)],
                               "edges": [{"source": s, "target": t, "weight": w} for s, t, w in edges]}))
        return
    for s in read_supernodes(data):
        click.echo(f"{s.label}: {' '.join(s.node_ids)}")
    click.echo(f"strongest edges between groups (of {len(view.names)} groups):")
    for source, target, weight in edges:
        click.echo(f"  {source} -> {target}: {weight:+.3f}")
