"""Feature dashboards as Neuronpedia feature JSON and as a standalone HTML page (no torch).

Neuronpedia feature JSON is the per-feature file Neuronpedia's and circuit-tracer's graph explorers
load for a node's card (``features/<scan>/<cantor(layer, feature)>.json``): ``top_logits`` /
``bottom_logits`` token strings, ``act_min`` / ``act_max``, and ``examples_quantiles``, a list of
``{quantile_name, examples}`` groups — "Top activations" first, then "Subsample Interval q" from
the strongest interval down — whose examples are ``{tokens, tokens_acts_list, train_token_ind,
is_repeated_datapoint}``. The activation histogram goes in ``freq_hist_data_bar_values`` (bin
upper edges) / ``freq_hist_data_bar_heights`` (counts), density in ``activation_frequency`` and the
human label in ``explanations``, as in Neuronpedia's feature exports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mechscope.features.store import Example, FeatureDashboard, FeatureStore
from mechscope.node_ids import cantor_pair
from mechscope.paths import atomic_write_text

__all__ = ["neuronpedia_feature", "write_neuronpedia_features", "dashboard_html"]


def _example(example: Example, repeated: bool = False) -> dict:
    return {"tokens": example.tokens, "tokens_acts_list": [round(a, 4) for a in example.acts],
            "train_token_ind": example.center, "is_repeated_datapoint": repeated}


def neuronpedia_feature(dashboard: FeatureDashboard, model: str, scan: str) -> dict:
    """One feature's dashboard as a Neuronpedia feature JSON object (see the module docstring)."""
    top = {(e.sequence, e.position) for e in dashboard.top}
    quantiles = [{"quantile_name": "Top activations", "examples": [_example(e) for e in dashboard.top]}]
    quantiles += [{"quantile_name": f"Subsample Interval {q.index}",
                   "examples": [_example(e, (e.sequence, e.position) in top) for e in q.examples]}
                  for q in dashboard.quantiles]
    bars = [(edge, count) for edge, count in zip(dashboard.hist_edges + [float("inf")], dashboard.hist) if count]
    return {
        "modelId": model, "layer": f"{dashboard.layer}-{scan}", "index": cantor_pair(dashboard.layer, dashboard.feature),
        "feature": dashboard.feature, "source_layer": dashboard.layer,
        "top_logits": [t for t, _ in dashboard.pos_tokens], "bottom_logits": [t for t, _ in dashboard.neg_tokens],
        "pos_str": [t for t, _ in dashboard.pos_tokens], "pos_values": [v for _, v in dashboard.pos_tokens],
        "neg_str": [t for t, _ in dashboard.neg_tokens], "neg_values": [v for _, v in dashboard.neg_tokens],
        "act_min": 0.0, "act_max": dashboard.max_value, "activation_frequency": dashboard.density,
        "freq_hist_data_bar_values": [e if e != float("inf") else None for e, _ in bars],
        "freq_hist_data_bar_heights": [c for _, c in bars],
        "examples_quantiles": quantiles,
        "explanations": [{"description": dashboard.label}] if dashboard.label else [],
    }


def write_neuronpedia_features(store: FeatureStore, out: str | os.PathLike,
                               features: list[tuple[int, int]] | None = None) -> list[Path]:
    """Write ``out/<scan>/<cantor(layer, feature)>.json`` for ``features`` (default: every feature
    that fired), each atomically.

    Raises:
        BadInputError: a feature that is not in the store.
    """
    scan, model = store.meta["transcoders"], store.meta["model"]
    if features is None:
        features = [(layer, feature) for layer, feature, _ in store.active_features()]
    paths = []
    for layer, feature in features:
        dashboard = store.feature(layer, feature)
        path = Path(out) / scan / f"{cantor_pair(layer, feature)}.json"
        atomic_write_text(path, json.dumps(neuronpedia_feature(dashboard, model, scan)))
        paths.append(path)
    return paths


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>feature {{ d.layer }}/{{ d.feature }}{% if d.label %} — {{ d.label }}{% endif %}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.meta { color: #555; } .cols { display: flex; gap: 3em; flex-wrap: wrap; }
table.logits td { padding: 0 .6em 0 0; font-family: ui-monospace, monospace; }
.pos { color: #1a7f37; } .neg { color: #c62828; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: .25em 0; padding: .2em .4em;
           border-left: 3px solid #ddd; }
.example .v { color: #888; display: inline-block; min-width: 5.5em; }
.tok { border-radius: 2px; } .tok.center { outline: 1px solid #b45309; }
svg rect { fill: #e07b00; } svg text { font-size: 10px; fill: #555; }
</style></head><body>
<h1>feature {{ d.layer }}/{{ d.feature }}{% if d.label %} — “{{ d.label }}”{% endif %}</h1>
<div class="meta">{{ meta.model }} · {{ meta.transcoders }} · density {{ "%.3e"|format(d.density) }}
({{ d.active }} of {{ meta.n_tokens }} tokens) · max activation {{ "%.3f"|format(d.max_value) }}</div>
<div class="cols">
<div><h2>Promotes (direct logit effect)</h2><table class="logits">
{% for t, v in d.pos_tokens %}<tr><td>{{ t|tokrepr }}</td><td class="pos">{{ "%+.3f"|format(v) }}</td></tr>{% endfor %}
</table></div>
<div><h2>Suppresses</h2><table class="logits">
{% for t, v in d.neg_tokens %}<tr><td>{{ t|tokrepr }}</td><td class="neg">{{ "%+.3f"|format(v) }}</td></tr>{% endfor %}
</table></div>
<div><h2>Activation histogram</h2>{{ histogram|safe }}</div>
</div>
<h2>Top activations</h2>
{% for e in d.top %}{{ example(e) }}{% else %}<p>The feature never fired on the corpus.</p>{% endfor %}
{% for q in d.quantiles %}<h2>Interval {{ q.index }}: activation in ({{ "%.3f"|format(q.low) }},
{{ "%.3f"|format(q.high) }}]</h2>{% for e in q.examples %}{{ example(e) }}{% endfor %}{% endfor %}
</body></html>
"""

_EXAMPLE = """<div class="example"><span class="v">{{ "%.3f"|format(e.value) }}</span>{% for t, a in pairs
%}<span class="tok{% if loop.index0 == e.center %} center{% endif %}" title="{{ "%.3f"|format(a) }}"
style="background: rgba(224, 123, 0, {{ "%.2f"|format([a / top, 1]|min if a > 0 and top > 0 else 0) }})">{{
t }}</span>{% endfor %}</div>"""


def _histogram_svg(dashboard: FeatureDashboard, width: int = 360, height: int = 110) -> str:
    bins = [(i, c) for i, c in enumerate(dashboard.hist) if c]
    if not bins:
        return "<p>no activations</p>"
    first, last = bins[0][0], bins[-1][0]
    n, peak = last - first + 1, max(c for _, c in bins)
    bar = width / n
    rects = "".join(
        f'<rect x="{(i - first) * bar:.1f}" y="{height - 14 - (height - 20) * c / peak:.1f}" width="{max(bar - 1, 1):.1f}" '
        f'height="{(height - 20) * c / peak:.1f}"><title>{c} tokens</title></rect>' for i, c in bins)
    edges = dashboard.hist_edges
    low = edges[first - 1] if first > 0 else 0.0
    high = edges[last] if last < len(edges) else edges[-1]
    labels = (f'<text x="0" y="{height - 2}">{low:.3g}</text>'
              f'<text x="{width}" y="{height - 2}" text-anchor="end">{high:.3g} (log bins)</text>')
    return f'<svg width="{width}" height="{height}" role="img">{rects}{labels}</svg>'


def dashboard_html(dashboard: FeatureDashboard, meta: dict) -> str:
    """A standalone HTML page of one feature's dashboard: no scripts, fonts or remote resources; tokens
    are shaded by activation relative to the feature's maximum, hovering shows the value.

    Args:
        meta: the store's ``meta`` (``model``, ``transcoders``, ``n_tokens``).
    """
    from jinja2 import Environment
    from markupsafe import Markup

    env = Environment(autoescape=True)
    env.filters["tokrepr"] = repr
    example_template = env.from_string(_EXAMPLE)

    def example(e: Example) -> Markup:
        return Markup(example_template.render(e=e, pairs=list(zip(e.tokens, e.acts)), top=dashboard.max_value))

    return env.from_string(_PAGE).render(d=dashboard, meta=meta, histogram=_histogram_svg(dashboard), example=example)
