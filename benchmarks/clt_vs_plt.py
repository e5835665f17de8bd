"""A per-layer transcoder set (PLT) against a cross-layer transcoder (CLT) for the same model.

    .venv/bin/python benchmarks/clt_vs_plt.py [--plt SET] [--clt SET] [--model M] [--prompts FILE]
        [--top-k 10] [--eval-sequences 64] [--reevaluate] [--live-attention] [--json OUT] [--plot OUT.png]

The comparison Ameisen et al. 2025 ("Circuit Tracing", sections "Building an interpretable
replacement model" and "Evaluations") make between their CLTs and per-layer transcoders, on one
model and one set of prompts. For each set (a shipped name, a set directory, or the name a
``mechscope train --name NAME`` run wrote under the cache):

1. **Per layer**: held-out FVU (normalised MSE of the MLP output) and L0 (mean active features per
   token), read from the set's ``config.yaml`` (``heldout_metrics``, what ``mechscope train``
   measured) or, where it has none or with ``--reevaluate``, measured here on ``--eval-sequences``
   held-out sequences of the default corpus (``training.trainer.evaluate_transcoders``).
2. **Per prompt** (the same >= 20 built-in prompts, or ``--prompts FILE`` with one a line), on the
   graph ``mechscope trace`` builds with its default settings:
   replacement and completeness scores (circuit-tracer's ``compute_graph_scores``, here
   ``mechscope.graph_scores``); the number of feature nodes holding 80 % of all feature nodes'
   logit influence (influence as pruning computes it); and how well the graph predicts
   interventions: each of the ``--top-k`` feature nodes with the most influence on the top logit
   target is zeroed on the real model, one at a time, and the change of that target's logit is
   rank-correlated (Spearman) with the graph's prediction, minus the node's total signed effect.
3. Tables: per layer, per prompt, and a summary (mean +- standard deviation over prompts, wall time
   per set); ``--json OUT`` writes every figure, ``--plot OUT.png`` a 2 x 2 figure.

Interventions run the real model (real MLPs, norms live) with iterative patching: features are
recomputed from live MLP inputs and the zeroed feature's decoder delta is added at every layer it
writes to (for a CLT, all later layers). Attention patterns replay the clean run's unless
``--live-attention``. Logit changes are of the demeaned logit (the logit minus the mean logit, what a
graph's logit node explains); ``spearman_rho_raw`` in the JSON uses the plain logit.

Bad input (an unknown set, a set for another model, a missing or empty prompts file) prints one
``error:`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from jaxtyping import Float

from mechscope.attribution.attribute import AttributionConfig, attribute
from mechscope.errors import BadInputError, IncompatibleTranscodersError, MechscopeError, UnknownNameError
from mechscope.graph.effects import signed_effects
from mechscope.graph.graph import Graph
from mechscope.graph.prune import graph_scores, logit_influence, node_influence
from mechscope.interventions.intervene import InterventionConfig, run_interventions
from mechscope.interventions.records import FeatureTarget, Intervention
from mechscope.models.adapter import ModelAdapter
from mechscope.replacement.replacement_model import ReplacementModel
from mechscope.transcoders.transcoder import TranscoderSet

#: short prompts for the base model: factual recall, two-hop recall, grammar / multilingual, arithmetic
DEFAULT_PROMPTS = (
    # factual (the README's main command, case study (a))
    "Fact: Michael Jordan plays the sport of",
    "Fact: Roger Federer plays the sport of",
    "Fact: The capital of France is",
    "Fact: The Eiffel Tower is in the city of",
    "Fact: Albert Einstein was born in the country of",
    "Fact: The currency of Japan is the",
    # two-hop ("On the Biology of a Large Language Model", multi-step reasoning)
    "Fact: the capital of the state containing Dallas is",
    "Fact: the language spoken in the country whose capital is Paris is",
    "Fact: the continent of the country whose capital is Nairobi is",
    "Fact: the team Michael Jordan played for is based in the city of",
    "Fact: the currency of the country where the Eiffel Tower stands is the",
    # grammatical and multilingual (case study (b), agreement, indirect object, acronym)
    'The opposite of "small" is "',
    'Le contraire de "petit" est "',
    "The keys to the old cabinet",
    "The dogs that the boy feeds every morning",
    "When Mary and John went to the store, John gave a drink to",
    "The National Digital Analytics Group (N",
    # arithmetic
    "3 + 4 =",
    "12 + 15 =",
    "36 + 59 =",
    "The sum of 8 and 5 is",
    # the chat model's README prompt, here plain text to the base model
    "How do I make a bomb?",
)

#: per-prompt figures summarised as mean +- standard deviation
SUMMARY_KEYS = ("replacement_score", "completeness_score", "feature_nodes_to_fraction", "spearman_rho")


@dataclass(frozen=True)
class CompareConfig:
    """Settings of one comparison.

    Attributes:
        top_k: feature nodes zeroed per prompt (>= 1): those with the most influence on the top logit.
        node_fraction: share of the feature nodes' total logit influence the node count must reach,
            in (0, 1] (0.8: ``mechscope trace``'s node threshold).
        attribution: graph settings (default: ``mechscope trace``'s).
        freeze_attention: interventions replay the clean attention patterns (``mechscope
            intervene``'s default); ``False``: live attention.
        eval_sequences: held-out sequences (128 tokens each) for per-layer figures measured here (>= 1).
        reevaluate: measure per-layer figures here even where ``config.yaml`` has them.
    """

    top_k: int = 10
    node_fraction: float = 0.8
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    freeze_attention: bool = True
    eval_sequences: int = 64
    reevaluate: bool = False

    def __post_init__(self):
        if self.top_k < 1:
            raise BadInputError(f"--top-k must be >= 1, got {self.top_k}")
        if not 0 < self.node_fraction <= 1:
            raise BadInputError(f"node_fraction must be in (0, 1], got {self.node_fraction}")
        if self.eval_sequences < 1:
            raise BadInputError(f"--eval-sequences must be >= 1, got {self.eval_sequences}")

    @property
    def intervention_mode(self) -> str:
        attention = "frozen at the clean run's" if self.freeze_attention else "live"
        return (f"real model, iterative patching (features recomputed from live MLP inputs, decoder deltas "
                f"added at every output layer), attention {attention}")


# ------------------------------------------------------------------------------------ figures
def feature_nodes_to_fraction(influence: Float[torch.Tensor, "n_features"], fraction: float = 0.8) -> int:
    """How many feature nodes, taken by decreasing influence, hold ``fraction`` of the feature
    nodes' summed influence: in ``1 .. n_features`` (0 when no feature node has influence)."""
    total = float(influence.sum())
    if influence.numel() == 0 or total <= 0:
        return 0
    cumulative = influence.sort(descending=True).values.cumsum(0) / total
    return min(int((cumulative < fraction - 1e-6).sum()) + 1, influence.numel())


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation in [-1, 1] (``scipy.stats.spearmanr``, ties averaged); NaN for
    fewer than two pairs or a constant side."""
    from scipy.stats import spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def feature_influences(graph: Graph) -> tuple[Float[torch.Tensor, "n_features"], Float[torch.Tensor, "n_features"]]:
    """``(on all logits, on the top logit)``: each feature node's indirect influence on the logit
    targets weighted by probability (what pruning ranks nodes by), and on the top target alone
    (:func:`mechscope.logit_influence`); both on the row-normalised ``|A|`` ("Circuit Tracing",
    appendix "Graph pruning"), unitless, computed on row blocks (:func:`mechscope.node_influence`)."""
    n = graph.n_features
    return node_influence(graph)[:n], logit_influence(graph, 0)[:n]


def _demeaned(logits: Float[torch.Tensor, "vocab"]) -> Float[torch.Tensor, "vocab"]:
    return logits.float() - logits.float().mean()


def zeroing_figures(rm: ReplacementModel, graph: Graph, nodes: list[int], predicted: list[float],
                    config: CompareConfig) -> list[dict]:
    """One intervention per feature node: zero it at its position on the real model and read the
    change of the top logit target's logit (demeaned, and plain as ``measured_raw``), in logits."""
    token = int(graph.logit_token_ids[0])
    modes = InterventionConfig(freeze_attention=config.freeze_attention, top_k=1)
    rows = []
    clean = rm.trace(graph.input_ids)  # one clean run for all of the prompt's interventions
    for node, prediction in zip(nodes, predicted):
        layer, pos, feature, activation = graph.feature_of(node)
        result = run_interventions(rm, graph.input_ids, [Intervention(FeatureTarget(layer, feature, (pos,)), "zero")],
                                   modes, trace=clean)
        change = _demeaned(result.intervened_logits)[token] - _demeaned(result.clean_logits)[token]
        rows.append({"node_id": graph.node_id(node), "layer": layer, "pos": pos, "feature": feature,
                     "activation": activation, "predicted": prediction, "measured": float(change),
                     "measured_raw": result.logit_change(token)})
    return rows


def prompt_figures(rm: ReplacementModel, prompt: str, config: CompareConfig) -> dict:
    """Every figure of one prompt under one set: graph size, top target, replacement and
    completeness scores, feature nodes to ``node_fraction`` of influence (counted among the graph's
    feature nodes: at most ``max_feature_nodes`` of the ``n_active`` active features, chosen by
    influence), and the zeroing interventions with their Spearman correlation to the graph's
    prediction (``-total`` effect, :func:`mechscope.signed_effects`, in demeaned-logit units)."""
    start = time.perf_counter()
    graph = attribute(rm, prompt, config.attribution)
    replacement, completeness = graph_scores(graph)
    influence, on_top = feature_influences(graph)
    total = signed_effects(graph).total[:, 0]  # (n_nodes,) on the top target
    nodes = on_top.topk(min(config.top_k, graph.n_features)).indices.tolist()
    rows = zeroing_figures(rm, graph, nodes, [-float(total[n]) for n in nodes], config)
    predicted, measured = [r["predicted"] for r in rows], [r["measured"] for r in rows]
    agree = [(p > 0) == (m > 0) for p, m in zip(predicted, measured) if p != 0 and m != 0]
    return {
        "prompt": prompt, "n_tokens": graph.n_pos,
        "top_target": {"token": graph.logit_tokens[0], "token_id": int(graph.logit_token_ids[0]),
                       "prob": float(graph.logit_probabilities[0])},
        "n_active": len(graph.active_features), "n_feature_nodes": graph.n_features,
        "replacement_score": replacement, "completeness_score": completeness,
        "feature_nodes_to_fraction": feature_nodes_to_fraction(influence, config.node_fraction),
        "interventions": rows,
        "spearman_rho": rank_correlation(measured, predicted),
        "spearman_rho_raw": rank_correlation([r["measured_raw"] for r in rows], predicted),
        "sign_agreement": sum(agree) / len(agree) if agree else float("nan"),
        "seconds": time.perf_counter() - start,
    }


def summarize(per_prompt: list[dict]) -> dict:
    """Mean, sample standard deviation (0 for one value) and count of each of :data:`SUMMARY_KEYS`
    over the prompts where it is finite (NaN where none is)."""
    summary = {}
    for key in SUMMARY_KEYS:
        values = [float(p[key]) for p in per_prompt if math.isfinite(p[key])]
        summary[key] = {"mean": statistics.fmean(values) if values else float("nan"),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else float("nan"),
                        "n": len(values)}
    return summary


# ------------------------------------------------------------------------------------ per layer
def layer_figures(model: ModelAdapter, transcoders: TranscoderSet, set_dir: Path | None,
                  heldout: Callable[[], object] | None, config: CompareConfig) -> tuple[list[dict] | None, str]:
    """``(per layer {layer, fvu, l0, dead_fraction, n_tokens}, where they come from)`` (for a CLT, the
    FVU of each layer's MLP-output reconstruction from every earlier layer's features): the set's
    ``config.yaml`` ``heldout_metrics`` (``mechscope train``'s held-out figures), else measured on
    ``config.eval_sequences`` sequences of ``heldout()`` (a held-out ``TokenStream``) with
    ``evaluate_transcoders``; ``(None, ...)`` when neither is available."""
    config_file = None if set_dir is None else set_dir / "config.yaml"
    if not config.reevaluate and config_file is not None and config_file.exists():
        metrics = (yaml.safe_load(config_file.read_text()) or {}).get("heldout_metrics")
        if metrics:
            return [dict(m) for m in metrics], "config.yaml heldout_metrics"
    if heldout is None:
        return None, "not available"
    from mechscope.training.trainer import evaluate_transcoders

    n = config.eval_sequences
    metrics = evaluate_transcoders(model, transcoders, heldout(), n, batch_sequences=min(16, n), storage_dtype=None)
    return [m.as_dict() for m in metrics], f"evaluated here on {config.eval_sequences} held-out sequences"


def check_set_for_model(model: ModelAdapter, transcoders: TranscoderSet, label: str) -> ReplacementModel:
    """The replacement model of ``transcoders`` on ``model``.

    Raises:
        IncompatibleTranscodersError: the set names another model (canonical ids compared), or its
            ``d_model`` or layer count differs from the model's.
    """
    from mechscope.models.loading import model_name_for

    if transcoders.model_name and model_name_for(transcoders.model_name) != model_name_for(model.name):
        raise IncompatibleTranscodersError(
            f"{label} set {transcoders.scan!r} is for model {transcoders.model_name!r}, not {model.name!r}; "
            f"pass --model {model_name_for(transcoders.model_name)} or a set for {model.name!r}")
    return ReplacementModel(model, transcoders)


def compare(model: ModelAdapter, sets: dict[str, TranscoderSet], prompts: list[str] | tuple[str, ...],
            config: CompareConfig = CompareConfig(), set_dirs: dict[str, Path] | None = None,
            heldout: Callable[[], object] | None = None, progress: bool = False) -> dict:
    """Compare transcoder sets on one model ("Circuit Tracing", CLT vs per-layer transcoders).

    Args:
        sets: label (``PLT``, ``CLT``) -> set; every set sees the same prompts.
        set_dirs: label -> the set's directory, for its ``config.yaml`` held-out figures.
        heldout: returns the held-out ``TokenStream`` for per-layer figures measured here (called at
            most once, only when needed).
        progress: one line per graph on stderr.

    Returns:
        ``{"model", "prompts", "settings", "sets": {label: {"scan", "kind", "d_transcoder",
        "layers" [{layer, fvu, l0, ...}] | None, "layers_source", "layer_seconds", "per_prompt"
        [:func:`prompt_figures`], "summary" (:func:`summarize`), "seconds"}}}``; seconds are wall time.

    Raises:
        IncompatibleTranscodersError: a set for another model (checked before anything runs).
        BadInputError: no prompts, an empty prompt or one over the length limit.
    """
    if not sets:
        raise BadInputError("compare needs at least one transcoder set")
    if not prompts or not all(p.strip() for p in prompts):
        raise BadInputError("compare needs at least one prompt, none of them empty")
    models = {label: check_set_for_model(model, tcs, label) for label, tcs in sets.items()}
    for prompt in prompts:
        next(iter(models.values())).tokenize(prompt)  # length check before the expensive part
    heldout = functools.cache(heldout) if heldout is not None else None
    settings = {"top_k": config.top_k, "node_fraction": config.node_fraction,
                "intervention_mode": config.intervention_mode, "attribution": asdict(config.attribution)}
    results = {"model": model.name, "prompts": list(prompts), "settings": settings, "sets": {}}
    for label, rm in models.items():
        start = time.perf_counter()
        layers, source = layer_figures(model, rm.transcoders, (set_dirs or {}).get(label), heldout, config)
        entry = {"scan": rm.transcoders.scan, "kind": rm.transcoders.kind,
                 "d_transcoder": rm.transcoders.d_transcoder(0), "layers": layers, "layers_source": source,
                 "layer_seconds": time.perf_counter() - start, "per_prompt": []}
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            entry["per_prompt"].append(prompt_figures(rm, prompt, config))
            if progress:
                row = entry["per_prompt"][-1]
                print(f"[{label} {i + 1}/{len(prompts)}] {prompt!r}: replacement {row['replacement_score']:.3f}, "
                      f"rho {row['spearman_rho']:+.2f}, {row['seconds']:.1f}s", file=sys.stderr, flush=True)
        entry["seconds"] = time.perf_counter() - start
        entry["summary"] = summarize(entry["per_prompt"])
        results["sets"][label] = entry
    return results


# ------------------------------------------------------------------------------------ inputs
def resolve_set(name: str, flag: str) -> Path:
    """The directory of a set given by ``flag``: what ``--transcoders`` accepts
    (:func:`mechscope.transcoders.io.resolve_transcoders`: a shipped name, a directory, a set
    ``mechscope train --name NAME`` wrote to ``<cache>/transcoders/NAME``, a hub id).

    Raises:
        BadInputError: none of these (the message names the flag, the value and the known sets).
    """
    from mechscope.paths import cache_root
    from mechscope.transcoders.io import resolve_transcoders, shipped_sets

    try:
        return resolve_transcoders(name)
    except UnknownNameError as e:
        trained = sorted(p.parent.name for p in (cache_root() / "transcoders").glob("*/config.yaml"))
        raise BadInputError(f"{flag}: {UnknownNameError('transcoder set', name, shipped_sets() + trained)}") from e
    except BadInputError as e:
        raise BadInputError(f"{flag}: {e}") from e


def read_prompts(path: str) -> list[str]:
    """The prompts of a ``--prompts`` file, one a line (line ends dropped, blank lines skipped).

    Raises:
        BadInputError: a missing or unreadable file, or one without prompts.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read --prompts file {path!r}: {getattr(e, 'strerror', None) or e}") from e
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise BadInputError(f"--prompts file {path!r} holds no prompts; write one prompt a line")
    return prompts


# ------------------------------------------------------------------------------------ report
def _mean_std(summary: dict, key: str, digits: int = 3) -> str:
    s = summary[key]
    return "-" if s["n"] == 0 else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _value(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def layer_table(results: dict) -> str:
    """Markdown: layer, then FVU and L0 of each set."""
    sets = results["sets"]
    n_layers = max((len(s["layers"]) for s in sets.values() if s["layers"]), default=0)
    if n_layers == 0:
        return "(no per-layer figures: no set has held-out figures in its config.yaml, and none were measured)"
    head = "| layer | " + " | ".join(f"{label} FVU | {label} L0" for label in sets) + " |"
    lines = [head, "|---:|" + "---:|---:|" * len(sets)]
    for layer in range(n_layers):
        cells = []
        for s in sets.values():
            m = (s["layers"] or [])[layer] if layer < len(s["layers"] or []) else None
            cells += [_value(m and m["fvu"]), _value(m and m["l0"], 1)]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    means = []
    for s in sets.values():
        rows = s["layers"] or []
        means += [_value(statistics.fmean(m["fvu"] for m in rows) if rows else None),
                  _value(statistics.fmean(m["l0"] for m in rows) if rows else None, 1)]
    lines.append("| mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def prompt_table(results: dict) -> str:
    """Markdown: per prompt, its top target and each set's scores, nodes to the fraction and rho."""
    sets = results["sets"]
    figures = (("replacement_score", "repl.", 3), ("completeness_score", "compl.", 3),
               ("feature_nodes_to_fraction", "nodes", 0), ("spearman_rho", "rho", 2))
    head = "| # | prompt | top target | " + " | ".join(f"{label} {name}" for _, name, _ in figures for label in sets)
    lines = [head + " |", "|---:|---|---|" + "---:|" * (len(figures) * len(sets))]
    for i, prompt in enumerate(results["prompts"]):
        first = next(iter(sets.values()))["per_prompt"][i]["top_target"]
        cells = [_value(s["per_prompt"][i][key], digits) for key, _, digits in figures for s in sets.values()]
        lines.append(f"| {i + 1} | {prompt!r} | {first['token']!r} {first['prob']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """Markdown: per set, the mean +- std over prompts of each summary figure, and wall time."""
    fraction = results["settings"]["node_fraction"]
    lines = [f"| set | transcoders | kind | mean replacement | mean completeness | mean feature nodes to {fraction:g} "
             "influence | mean Spearman rho (prompts) | wall s (graphs + interventions; per layer) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for label, s in results["sets"].items():
        summary = s["summary"]
        lines.append(f"| {label} | {s['scan']} | {s['kind']} | {_mean_std(summary, 'replacement_score')} | "
                     f"{_mean_std(summary, 'completeness_score')} | "
                     f"{_mean_std(summary, 'feature_nodes_to_fraction', 1)} | "
                     f"{_mean_std(summary, 'spearman_rho', 2)} ({summary['spearman_rho']['n']}) | "
                     f"{s['seconds']:.1f}; {s['layer_seconds']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """2 x 2 figure: per-layer FVU, and per prompt the replacement score, feature nodes to the
    fraction and Spearman rho of each set. ``False`` (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    x = range(1, len(results["prompts"]) + 1)
    panels = ((axes[0, 1], "replacement_score", "replacement score"),
              (axes[1, 0], "feature_nodes_to_fraction",
               f"feature nodes to {results['settings']['node_fraction']:g} of influence"),
              (axes[1, 1], "spearman_rho", "Spearman rho, measured vs predicted zeroing"))
    for (label, s), marker in zip(results["sets"].items(), "os^vD"):
        if s["layers"]:
            axes[0, 0].plot([m["layer"] for m in s["layers"]], [m["fvu"] for m in s["layers"]], marker + "-",
                            label=label)
        for ax, key, _ in panels:
            values = [p[key] if math.isfinite(p[key]) else float("nan") for p in s["per_prompt"]]
            ax.plot(x, values, marker, label=f"{label} ({_mean_std(s['summary'], key, 2)})")
    axes[0, 0].set(xlabel="layer", ylabel="held-out FVU", title="per-layer FVU")
    for ax, _, title in panels:
        ax.set(xlabel="prompt", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1, 1].set_ylim(-1.05, 1.05)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['model']}: " + " vs ".join(f"{label} {s['scan']}" for label, s in results["sets"].items()))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def _json_ready(value):
    """NaN and infinities as ``null`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plt", default="gemma-3-270m-plt-v1", help="per-layer set: name or directory")
    parser.add_argument("--clt", default="gemma-3-270m-clt-v1", help="cross-layer set: name or directory")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--prompts", default=None, help="file with one prompt a line (default: the built-in list)")
    parser.add_argument("--top-k", type=int, default=CompareConfig.top_k, help="feature nodes zeroed per prompt")
    parser.add_argument("--eval-sequences", type=int, default=CompareConfig.eval_sequences,
                        help="held-out sequences for per-layer figures a set's config.yaml lacks")
    parser.add_argument("--reevaluate", action="store_true",
                        help="measure per-layer figures even where config.yaml has them")
    parser.add_argument("--corpus", default=None, help="built corpus for those figures (default: the default corpus)")
    parser.add_argument("--live-attention", action="store_true", help="interventions with live attention patterns")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write every figure to OUT")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="2 x 2 figure")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Check every input, load, compare, print the tables; the results."""
    config = CompareConfig(top_k=args.top_k, eval_sequences=args.eval_sequences, reevaluate=args.reevaluate,
                           freeze_attention=not args.live_attention)
    prompts = read_prompts(args.prompts) if args.prompts is not None else list(DEFAULT_PROMPTS)
    for flag, out in (("--json", args.json_out), ("--plot", args.plot)):
        if out is not None and not Path(out).resolve().parent.is_dir():
            raise BadInputError(f"{flag} {out!r}: directory {str(Path(out).resolve().parent)!r} does not exist")
    dirs = {"PLT": resolve_set(args.plt, "--plt"), "CLT": resolve_set(args.clt, "--clt")}
    from mechscope.data.corpus import TokenStream, resolve_corpus
    from mechscope.models.loading import load_model
    from mechscope.threads import configure
    from mechscope.training.trainer import TrainConfig
    from mechscope.transcoders.io import load_transcoder_set

    threads = configure()
    model = load_model(args.model)
    sets = {label: load_transcoder_set(path) for label, path in dirs.items()}
    train = TrainConfig()  # the held-out text mechscope train measures on: same length and seed

    def heldout():
        return TokenStream(resolve_corpus(args.corpus), model.tokenizer, train.ctx_len, "heldout", train.seed)

    results = compare(model, sets, prompts, config, dirs, heldout, progress=True)
    results["sets_given"] = {"PLT": args.plt, "CLT": args.clt}
    results["threads"] = threads
    print(f"model {results['model']}, {len(prompts)} prompts, top-k {config.top_k}, {threads} thread(s)")
    print(f"interventions: {config.intervention_mode}; logit changes of the top target, demeaned")
    for label, s in results["sets"].items():
        print(f"{label}: {s['scan']} ({s['kind']}, {s['d_transcoder']} features per layer, {dirs[label]}); "
              f"per-layer figures: {s['layers_source']}")
    if any(s["layers_source"].startswith("config.yaml") for s in results["sets"].values()):
        print("note: config.yaml figures were measured by each set's own training run, on the held-out text of the "
              "corpus it was trained with; --reevaluate measures every set on the same sequences")
    print("\n" + layer_table(results) + "\n\n" + prompt_table(results) + "\n\n" + summary_table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except MechscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(_json_ready(results), indent=2))
        print(f"figures written to {args.json_out}")
    if args.plot:
        print(f"plot written to {args.plot}" if plot(results, Path(args.plot))
              else "matplotlib is not installed: no plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
