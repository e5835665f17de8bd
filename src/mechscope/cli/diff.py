"""``mechscope diff A.json B.json``: what differs between two attribution graphs (see
:mod:`mechscope.graph.diff`)."""

from __future__ import annotations

import json

import click

from mechscope.errors import BadInputError

__all__ = ["diff"]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


@click.command()
@click.argument("graph_a", type=click.Path(dir_okay=False))
@click.argument("graph_b", type=click.Path(dir_okay=False))
@click.option("--top", type=int, default=10, show_default=True, help="Rows per list.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Write the diff as a graph JSON the explorer opens (nodes marked by graph, edges B - A).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def diff(graph_a, graph_b, top, out_path, as_json):
    """Compare two graphs of one model and transcoder set: positions aligned by token, features by
    (layer, index)."""
    from mechscope.export.schema import read_neuronpedia, validate_neuronpedia, write_neuronpedia
    from mechscope.graph.diff import diff_graph_json, diff_graphs

    if top < 1:
        raise BadInputError(f"--top must be >= 1, got {top}")
    a, b = read_neuronpedia(graph_a), read_neuronpedia(graph_b)
    result = diff_graphs(a, b)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if out_path:
        merged = diff_graph_json(a, b, slug=f"diff-{a['metadata']['slug']}-{b['metadata']['slug']}")
        validate_neuronpedia(merged)
        write_neuronpedia(merged, out_path)
    if as_json:
        click.echo(json.dumps(result.as_dict(top)))
        return
    echo = click.echo
    ta, tb = a["metadata"]["prompt_tokens"], b["metadata"]["prompt_tokens"]
    aligned = [f"{ta[pa] if pa is not None else '∅'!r}/{tb[pb] if pb is not None else '∅'!r}"
               for pa, pb in result.columns if pa is None or pb is None or ta[pa] != tb[pb]]
    echo(f"A: {a['metadata']['prompt']!r} (target {result.targets_a!r})")
    echo(f"B: {b['metadata']['prompt']!r} (target {result.targets_b!r})")
    echo(f"aligned {len(result.columns)} positions; differing: {', '.join(aligned) or 'none'}")
    echo(f"error nodes carry {result.error_share_a:.1%} of |total effect| in A, {result.error_share_b:.1%} in B")
    header = f"  {'feature':<16} {'token':<22} {'act A':>8} {'act B':>8} {'effect A':>9} {'effect B':>9}  label"
    for title, rows in (("changed most (matched features)", result.changed), ("only in A", result.only_a),
                        ("only in B", result.only_b)):
        echo(f"{title}: {len(rows)}")
        if rows:
            echo(header)
        for r in rows[:top]:
            echo(f"  {r.ref:<16} {r.token!r:<22} {_fmt(r.activation_a):>8} {_fmt(r.activation_b):>8} "
                 f"{_fmt(r.effect_a):>9} {_fmt(r.effect_b):>9}  {r.label}")
    for label, v in result.supernodes.items():
        echo(f"supernode {label!r}: activation {_fmt(v['activation_a'])} -> {_fmt(v['activation_b'])}, "
             f"total effect {_fmt(v['total_effect_a'])} -> {_fmt(v['total_effect_b'])}")
    if out_path:
        echo(f"diff graph written to {out_path} (explore it: mechscope serve)")
