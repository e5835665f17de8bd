"""mechscope against circuit-tracer: the same graph, side by side, with time and memory.

    bash benchmarks/setup_circuit_tracer.sh          # once: circuit-tracer 0.5.0 in benchmarks/.venv-ct
    .venv/bin/python benchmarks/vs_circuit_tracer.py [--prompts short,medium,long,xl] [--sweep-nodes 512,2048,8192,all]

Both tools run in their own process (so peak RSS is each one's own) on the same local model
directory (the embedded Gemma 3 270M), the same transcoder set (mechscope's shipped one), the same
prompt and settings (``max_n_logits``, ``desired_logit_prob``, ``batch_size``,
``max_feature_nodes``, float32, 2 threads). circuit-tracer runs with its nnsight backend and one
fix (see ``_circuit_tracer_run.py``: token vectors get the embedding scale). mechscope runs as the
``mechscope trace --json`` command, so its peak RSS includes pruning, scoring and export;
circuit-tracer's is taken right after its ``attribute`` call. That command saves only the pruned
graph's edges, so where circuit-tracer ran, mechscope runs a second time with ``--full-graph`` for
the adjacency comparison (not timed).

Per prompt (about 8, 32, 128 and 512 tokens, at mechscope's default settings) it prints logit
targets, whether the active and selected feature sets are equal, the adjacency's max |difference| /
max |A|, replacement and completeness scores of each (each tool's own code), attribution wall time
and peak RSS of each, and the ratios; then the same for a sweep of ``max_feature_nodes`` on one
prompt. circuit-tracer is not started where its two dense float32 edge matrices alone exceed the
machine's memory (the reason is recorded). Results go to ``benchmarks/results/vs_circuit_tracer.json``
and a plot of time and memory against prompt length and feature nodes to ``docs/vs_circuit_tracer.png``.

The README's long-prompt table (9 to 2,047 tokens, mechscope alone; the 2,047-token prompt takes
about 47 minutes and 18 GiB on 2 cores):

    .venv/bin/python benchmarks/vs_circuit_tracer.py --prompts short,medium,long,xl,xxl --sweep-nodes "" \
        --mechscope-only --results benchmarks/results/long_prompts.json --plot docs/long_prompts.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch

from mechscope.graph.io import load_graph
from mechscope.models.loading import resolve_model_dir
from mechscope.transcoders.io import resolve_transcoders

ROOT = Path(__file__).resolve().parent
CT_PYTHON = ROOT / ".venv-ct" / "bin" / "python"
MECHSCOPE = Path(sys.executable).parent / "mechscope"

PROMPTS = {
    "short": "Fact: Michael Jordan plays the sport of",
    "medium": ("The capital of the state containing Dallas is Austin. The capital of the state containing "
               "Chicago is Springfield. The capital of the state containing Seattle is"),
    "long": ("In the spring of 1961 the club opened its season at home against the visitors from the coast. "
             "The crowd was small, the wind was cold, and the manager had promised a young pitcher his first "
             "start. He walked the first two batters, struck out the next three, and by the fifth inning the "
             "stands had filled with people who had heard on the radio that something unusual was happening. "
             "When the last out was made, the pitcher had allowed no hits at all, and the newspapers the next "
             "morning called it the finest game ever played in"),
    "xl": (
        'The old lighthouse stood on a rock at the edge of the bay, and for more than a hundred years a '
        'keeper had climbed its stairs every evening to light the lamp. The last keeper was a woman named '
        'Margaret, who had taken the job after her father retired. She kept a logbook in which she wrote down '
        'the weather, the ships that passed, and anything unusual she saw on the water. In the winter of 1952 '
        'a storm came in from the north that lasted four days. The wind tore shingles from the roof of the '
        "keeper's cottage, and waves broke over the rock so high that spray reached the lantern room. On the "
        'second night Margaret saw the lights of a fishing boat drifting toward the reef south of the point. '
        'Its engine had failed, and the crew of three were trying to row against the wind. She could not '
        'leave the lighthouse, because the lamp had to keep turning, but she had a radio, and she called the '
        'harbor master in the town across the bay. He sent the lifeboat, an open wooden boat with eight oars '
        'and a crew of volunteers. It took them two hours to reach the fishing boat, and by then it was less '
        'than a mile from the rocks. They threw a line, towed the boat into the lee of the island, and waited '
        'there until morning. When the storm ended, the whole town came down to the harbor to meet them. The '
        'newspaper printed a photograph of the lifeboat crew standing on the quay with the three fishermen, '
        'and a story about the keeper who had seen the boat in the dark. Margaret did not go to the '
        'celebration. She stayed at the lighthouse, cleaned the soot from the lens, and wrote in her logbook '
        'that the wind had gone round to the west and the sea was calming. Years later, when the lighthouse '
        'was automated and she moved into town, the logbooks were given to the local museum. Visitors can '
        'still read them there, page after page of careful handwriting about clouds, tides and passing ships. '
        'The entry for that February night is only two lines long. It says that a boat was in trouble near '
        'the reef, that the lifeboat was called, and that all the men were saved. The museum keeps the '
        'logbook open at that page, under glass, next to the photograph from the newspaper. The town later '
        'named a street after her, and on the anniversary of the storm the lifeboat crew still rows out to '
        "the rock and lays a wreath at the foot of the tower. The keeper's name was Margaret, and the town "
        'where she lived is called'
    ),
}


def _logbook(entries: int) -> str:
    """Dated logbook entries, deterministic, to lengthen the lighthouse story to about 2,048 tokens."""
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    winds = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
    ships = ["Aurora", "Kestrel", "Mary Ellen", "Northern Star", "Perseverance", "Gannet", "Two Brothers",
             "Elsie May", "Curlew", "Good Intent", "Heather Bell", "Pilot"]
    skies = ["clear", "overcast", "low cloud with drizzle", "fog in the morning, clearing by noon",
             "squalls of rain", "bright with high cloud"]
    lines = []
    for i in range(entries):
        lines.append(f"On {months[i % 12]} {1 + (7 * i) % 28}, 1953, the wind was from the {winds[(3 * i) % 8]} at "
                     f"{8 + (5 * i) % 23} knots and the sky was {skies[i % 6]}. The {ships[(5 * i) % 12]} passed "
                     f"inbound at {1 + i % 11} o'clock and the {ships[(7 * i + 3) % 12]} went out on the evening "
                     f"tide.")
    return " ".join(lines)


PROMPTS["xxl"] = (PROMPTS["xl"].rsplit(" The keeper's name", 1)[0] + " Some pages from her logbook of the following "
                  "year read as follows; she wrote each entry in pencil and inked it over the next morning. " + _logbook(28) + " The keeper's name was Margaret, and the town where "
                  "she lived is called")




def run_mechscope(prompt: str, settings: dict, out: Path, full_graph: bool = False) -> dict:
    """``mechscope trace`` as a user runs it (its saved graph keeps the pruned edges only), or with
    ``full_graph`` every edge, for the comparison of adjacency matrices (saving every edge as
    coordinates costs memory the default command does not spend, so that run is not the one timed)."""
    argv = [str(MECHSCOPE), "trace", prompt, "--json", "--out", str(out), "--batch-size", str(settings["batch_size"]),
            "--max-n-logits", str(settings["max_n_logits"]), "--desired-logit-prob", str(settings["desired_logit_prob"])]
    nodes = settings.get("max_feature_nodes")
    argv += ["--max-feature-nodes", "all" if nodes is None else str(nodes)]  # circuit-tracer's default: all
    argv += ["--max-prompt-tokens", "4096"]  # the xxl prompt has 2,047 tokens
    argv += ["--full-graph"] if full_graph else []
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-500:] or f"exit code {result.returncode}"}
    summary = json.loads(result.stdout)
    summary["graph"] = load_graph(out / summary["slug"])
    return summary


def run_circuit_tracer(prompt: str, settings: dict, out: Path) -> dict:
    if not CT_PYTHON.exists():
        return {"error": "not run: circuit-tracer is not installed (bash benchmarks/setup_circuit_tracer.sh)"}
    model_dir, _ = resolve_model_dir("gemma-3-270m")
    argv = [str(CT_PYTHON), str(ROOT / "_circuit_tracer_run.py"), str(model_dir),
            str(resolve_transcoders("gemma-3-270m-plt-v1")), str(out / "ct.pt"), json.dumps(settings), prompt]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-500:] or f"exit code {result.returncode} (killed: out of memory?)"}
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    summary["tensors"] = torch.load(out / "ct.pt")
    return summary


def compare(mine: dict, theirs: dict) -> dict:
    graph, ct = mine["graph"], theirs["tensors"]
    A, B = graph.adjacency.float(), ct["adjacency"].float()
    row = {"n_nodes": [A.shape[0], B.shape[0]],
           "logit_targets_equal": graph.logit_token_ids.tolist() == ct["logit_token_ids"].tolist(),
           "active_features_equal": torch.equal(graph.active_features.long(), ct["active_features"].long()),
           "selected_features_equal": torch.equal(graph.selected_features.long(), ct["selected_features"].long())}
    if A.shape == B.shape:
        scale = float(A.abs().max())
        bos = graph.token_offset  # the first token node's column
        keep = torch.ones(A.shape[1], dtype=torch.bool)
        keep[bos] = False
        row["adjacency_rel_diff"] = float((A - B).abs().max()) / scale
        row["adjacency_rel_diff_without_bos"] = float((A - B)[:, keep].abs().max()) / scale
    return row


def dense_bytes_circuit_tracer(mine: dict, settings: dict) -> int:
    """Bytes of circuit-tracer's two dense float32 copies of its edge matrix (the matrix and the
    normalised copy ``compute_partial_influences`` makes): ``(max_feature_nodes + n_logits) x
    (n_active + (n_layers + 1) * n_pos + n_logits)``, from mechscope's graph of the same prompt."""
    graph = mine["graph"]
    n_active = len(graph.active_features)
    nodes = settings["max_feature_nodes"]
    rows = (n_active if nodes is None else min(nodes, n_active)) + graph.n_logits
    return 2 * 4 * rows * (n_active + graph.n_errors + graph.n_pos + graph.n_logits)


def run_pair(name: str, prompt: str, settings: dict, circuit_tracer: bool = True) -> dict:
    """Both tools on one prompt; circuit-tracer is skipped (with the reason) when its dense edge
    matrices alone would not fit in this machine's memory, or when ``circuit_tracer`` is false."""
    with tempfile.TemporaryDirectory() as tmp:
        mine = run_mechscope(prompt, settings, Path(tmp) / "mechscope")
        row = {"prompt": name, "max_feature_nodes": settings["max_feature_nodes"],
               "n_tokens": len(mine["prompt_tokens"]) if "prompt_tokens" in mine else None}
        theirs = None
        if "error" in mine:
            theirs = {"error": "not run: mechscope failed"}
        elif not circuit_tracer:
            theirs = {"error": "not run: --mechscope-only"}
        if "graph" in mine:
            row["n_active"] = len(mine["graph"].active_features)
        if theirs is None:
            need, total = dense_bytes_circuit_tracer(mine, settings), psutil.virtual_memory().total
            if need > total:
                theirs = {"error": f"not run: its two dense float32 edge matrices need {need / 2**30:.1f} GiB, "
                                   f"this machine has {total / 2**30:.1f} GiB"}
            else:
                theirs = run_circuit_tracer(prompt, settings, Path(tmp))
        for tool, summary in (("mechscope", mine), ("circuit_tracer", theirs)):
            row[tool] = {k: summary.get(k) for k in ("attribution_seconds", "peak_rss_mb", "error")}
        if "graph" in mine:  # float16 rows (a prompt too long for float32 rows in memory) round its edges
            row["mechscope"]["edge_rows_dtype"] = mine["graph"].config.get("edge_rows_dtype", "float32")
        row["mechscope"]["scores"] = [mine.get("replacement_score"), mine.get("completeness_score")]
        row["circuit_tracer"]["scores"] = theirs.get("scores")
        if "error" not in mine and "error" not in theirs:
            every_edge = run_mechscope(prompt, settings, Path(tmp) / "mechscope-full", full_graph=True)
            if "error" in every_edge:
                row["adjacency_error"] = f"mechscope --full-graph failed: {every_edge['error']}"
            else:
                row |= compare(every_edge, theirs)
            row["speedup"] = theirs["attribution_seconds"] / mine["attribution_seconds"]
            row["memory_ratio"] = mine["peak_rss_mb"] / theirs["peak_rss_mb"]
    return row


def plot(results: list[dict], path: Path) -> None:
    """Attribution time and peak RSS of both tools against prompt length (default settings) and
    against max_feature_nodes (one prompt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r for r in results if r["kind"] == "length"]
    sweep = [r for r in results if r["kind"] == "nodes"]
    panels = [(lengths, "n_tokens", "prompt length (tokens)")]
    panels += [(sweep, "n_selected", "feature nodes (max_feature_nodes)")] if sweep else []
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7.5), squeeze=False)
    for column, (rows, key, label) in enumerate(panels):
        for tool, style in (("mechscope", "o-"), ("circuit_tracer", "s--")):
            points = [(r[key], r[tool]) for r in rows if r[tool].get("attribution_seconds") is not None]
            if not points:
                continue
            x = [p[0] for p in points]
            axes[0, column].plot(x, [p[1]["attribution_seconds"] for p in points], style, label=tool.replace("_", "-"))
            axes[1, column].plot(x, [p[1]["peak_rss_mb"] / 1024 for p in points], style, label=tool.replace("_", "-"))
        for row, unit in ((0, "attribution time (s)"), (1, "peak RSS (GiB)")):
            ax = axes[row, column]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    axes[0, 0].set_title("default settings (8192 feature nodes)")
    if sweep:
        axes[0, 1].set_title(f"{sweep[0]['prompt']!r} prompt ({sweep[0]['n_tokens']} tokens)")
    tools = "mechscope vs circuit-tracer 0.5.0" if circuit_tracer_ran(results) else "mechscope"
    fig.suptitle(f"{tools}: Gemma 3 270M, float32, 2 CPU threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def circuit_tracer_ran(rows: list[dict]) -> bool:
    """Whether any row has circuit-tracer's figures (else the rows are mechscope's alone)."""
    return any(r["circuit_tracer"].get("attribution_seconds") is not None for r in rows)


def mechscope_table(rows: list[dict]) -> str:
    """The README's long-prompt table (rows without circuit-tracer figures): one line per row."""
    lines = ["| prompt | tokens | active features | attribution | peak RSS of the whole `trace` | edge rows | "
             "replacement / completeness |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["mechscope"]
        if ms.get("attribution_seconds") is None:
            lines.append(f"| {r['prompt']} | {r['n_tokens']} | - | failed: {ms.get('error')} | - | - | - |")
            continue
        seconds = ms["attribution_seconds"]
        minutes = f" ({seconds / 60:.1f} min)" if seconds >= 120 else ""
        nodes = "" if r["max_feature_nodes"] == 8192 else f", max_feature_nodes {r['max_feature_nodes'] or 'all'}"
        lines.append(f"| {r['prompt']}{nodes} | {r['n_tokens']:,} | {r.get('n_active') or 0:,} | {seconds:,.1f} s{minutes} | "
                     f"{ms['peak_rss_mb'] / 1024:.2f} GiB | {ms.get('edge_rows_dtype', 'float32')} | "
                     f"{ms['scores'][0]:.4f} / {ms['scores'][1]:.4f} |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The README's table against circuit-tracer: one line per row of results (rows where
    circuit-tracer did not run at all: :func:`mechscope_table`)."""
    if not circuit_tracer_ran(rows):
        return mechscope_table(rows)
    def pair(tool_a, tool_b, fmt):
        return " / ".join("-" if v is None else fmt(v) for v in (tool_a, tool_b))

    lines = ["| prompt | tokens | active features | max_feature_nodes | same targets, active and selected features | "
             "max abs diff / max abs A | replacement score (mechscope / circuit-tracer) | completeness score | "
             "attribution s (mechscope / circuit-tracer) | speed-up | peak RSS GiB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, ct = r["mechscope"], r["circuit_tracer"]
        same = all(r.get(k) for k in ("logit_targets_equal", "active_features_equal", "selected_features_equal"))
        scores = [(ms["scores"] or [None, None])[i] for i in (0, 1)], [((ct.get("scores") or [None, None]))[i] for i in (0, 1)]
        lines.append(" | ".join([
            f"| {r['prompt']}", str(r["n_tokens"]), f"{r.get('n_active') or 0:,}", str(r["max_feature_nodes"] or "all"),
            ("yes" if same else "no") if "speedup" in r else "-",
            f"{r['adjacency_rel_diff']:.1e}" if "adjacency_rel_diff" in r else "-",
            pair(scores[0][0], scores[1][0], lambda v: f"{v:.4f}"), pair(scores[0][1], scores[1][1], lambda v: f"{v:.4f}"),
            pair(ms["attribution_seconds"], ct["attribution_seconds"], lambda v: f"{v:.1f}"),
            f"{r['speedup']:.1f}x" if "speedup" in r else "-",
            pair(ms["peak_rss_mb"], ct["peak_rss_mb"], lambda v: f"{v / 1024:.2f}"),
            f"{r['memory_ratio']:.2f}x |" if "memory_ratio" in r else "- |",
        ]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="short,medium,long,xl,xxl", help=f"comma-separated of {', '.join(PROMPTS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-n-logits", type=int, default=10)
    parser.add_argument("--desired-logit-prob", type=float, default=0.95)
    parser.add_argument("--max-feature-nodes", default="8192",
                        help="feature nodes, or 'all' (circuit-tracer's own default); default: mechscope's default")
    parser.add_argument("--sweep-nodes", default="512,2048,8192,all",
                        help="max_feature_nodes values for the sweep on --sweep-prompt ('' skips the sweep)")
    parser.add_argument("--sweep-prompt", default="medium", choices=list(PROMPTS))
    parser.add_argument("--update", action="store_true",
                        help="replace the measured rows in the last results file and keep the others")
    parser.add_argument("--report", action="store_true",
                        help="print the table and redraw the plot from the last results file, running nothing")
    parser.add_argument("--mechscope-only", action="store_true",
                        help="do not start circuit-tracer even where it is installed (the long-prompt table)")
    parser.add_argument("--results", default=str(ROOT / "results" / "vs_circuit_tracer.json"),
                        help="the results file (--update and --report read it)")
    parser.add_argument("--plot", default=str(ROOT.parent / "docs" / "vs_circuit_tracer.png"),
                        help="where the plot goes ('' for none)")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.results).read_text())
        print(json.dumps(saved["machine"]))
        print(markdown_table(saved["results"]))
        if args.plot:
            plot(saved["results"], Path(args.plot))
        return
    if not CT_PYTHON.exists() and not args.mechscope_only:
        print("circuit-tracer is not installed (bash benchmarks/setup_circuit_tracer.sh): measuring mechscope alone",
              file=sys.stderr)

    def settings_for(nodes: str) -> dict:
        return {"batch_size": args.batch_size, "max_n_logits": args.max_n_logits,
                "desired_logit_prob": args.desired_logit_prob,
                "max_feature_nodes": None if nodes == "all" else int(nodes), "dtype": "float32", "threads": 2}

    settings = settings_for(args.max_feature_nodes)
    out = Path(args.results)
    out.parent.mkdir(exist_ok=True)
    results = json.loads(out.read_text())["results"] if args.update and out.exists() else []

    def record(row: dict) -> None:  # each row is kept as soon as it is measured
        same = [i for i, r in enumerate(results) if (r["kind"], r["prompt"], r["max_feature_nodes"])
                == (row["kind"], row["prompt"], row["max_feature_nodes"])]
        if same:
            results[same[0]] = row
        else:
            results.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps({"settings": settings, "machine": machine(), "results": results}, indent=2))

    for name in filter(None, args.prompts.split(",")):
        record({"kind": "length"} | run_pair(name, PROMPTS[name], settings, not args.mechscope_only))
    for nodes in filter(None, args.sweep_nodes.split(",")):
        done = [r for r in results if r["kind"] == "length" and r["prompt"] == args.sweep_prompt
                and r["max_feature_nodes"] == settings_for(nodes)["max_feature_nodes"]]
        row = dict(done[0]) if done else run_pair(args.sweep_prompt, PROMPTS[args.sweep_prompt], settings_for(nodes),
                                                  not args.mechscope_only)
        row["kind"] = "nodes"
        record(row)
    for row in results:  # feature nodes actually kept (max_feature_nodes caps at the active count)
        row["n_selected"] = min(row.get("n_active") or 0, row["max_feature_nodes"] or row.get("n_active") or 0)
    out.write_text(json.dumps({"settings": settings, "machine": machine(), "results": results}, indent=2))
    print(f"results written to {out}")
    print(markdown_table(results))
    if args.plot:
        plot(results, Path(args.plot))
        print(f"plot written to {args.plot}")


def machine() -> dict:
    """Where the figures were measured."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    main()
