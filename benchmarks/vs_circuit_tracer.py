"""mechscope against circuit-tracer: the same graph, side by side, with time and memory.

    bash benchmarks/setup_circuit_tracer.sh          # once: circuit-tracer 0.5.0 in benchmarks/.venv-ct
    .venv/bin/python benchmarks/vs_circuit_tracer.py [--prompts short,medium,long] [--batch-size 64]

Both tools run in their own process (so peak RSS is each one's own) on the same local model
directory (the embedded Gemma 3 270M), the same transcoder set (mechscope's shipped one), the same
prompt and settings (``max_n_logits``, ``desired_logit_prob``, ``batch_size``,
``max_feature_nodes``, float32, 2 threads). circuit-tracer runs with its nnsight backend and one
fix (see ``_circuit_tracer_run.py``: token vectors get the embedding scale). Per prompt it prints
logit targets, whether the active and selected feature sets are equal, the adjacency's max
|difference| / max |A| (all columns, and without the BOS token's column), replacement and
completeness scores, attribution wall time and peak RSS of each, and the ratios; results also go
to ``benchmarks/results/vs_circuit_tracer.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mechscope.graph.io import load_graph
from mechscope.graph.prune import graph_scores
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
}


def run_mechscope(prompt: str, settings: dict, out: Path) -> dict:
    argv = [str(MECHSCOPE), "trace", prompt, "--json", "--out", str(out), "--batch-size", str(settings["batch_size"]),
            "--max-n-logits", str(settings["max_n_logits"]), "--desired-logit-prob", str(settings["desired_logit_prob"])]
    nodes = settings.get("max_feature_nodes")
    argv += ["--max-feature-nodes", "all" if nodes is None else str(nodes)]  # circuit-tracer's default: all
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-500:] or f"exit code {result.returncode}"}
    summary = json.loads(result.stdout)
    summary["graph"] = load_graph(out / summary["slug"])
    return summary


def run_circuit_tracer(prompt: str, settings: dict, out: Path) -> dict:
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
    row["mechscope_scores"] = list(graph_scores(graph))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="short,medium,long", help=f"comma-separated of {', '.join(PROMPTS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-n-logits", type=int, default=10)
    parser.add_argument("--desired-logit-prob", type=float, default=0.95)
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    args = parser.parse_args()
    if not CT_PYTHON.exists():
        sys.exit("circuit-tracer is not installed: run bash benchmarks/setup_circuit_tracer.sh")
    settings = {"batch_size": args.batch_size, "max_n_logits": args.max_n_logits,
                "desired_logit_prob": args.desired_logit_prob, "max_feature_nodes": args.max_feature_nodes,
                "dtype": "float32", "threads": 2}
    results = []
    for name in args.prompts.split(","):
        prompt = PROMPTS[name]
        with tempfile.TemporaryDirectory() as tmp:
            mine = run_mechscope(prompt, settings, Path(tmp) / "mechscope")
            theirs = run_circuit_tracer(prompt, settings, Path(tmp))
            row = {"prompt": name, "n_tokens": len(mine["prompt_tokens"]) if "prompt_tokens" in mine else None}
            for tool, summary in (("mechscope", mine), ("circuit_tracer", theirs)):
                row[tool] = {k: summary.get(k) for k in ("attribution_seconds", "peak_rss_mb", "error")}
            if "error" not in mine and "error" not in theirs:
                row |= compare(mine, theirs)
                row["speedup"] = theirs["attribution_seconds"] / mine["attribution_seconds"]
                row["memory_ratio"] = mine["peak_rss_mb"] / theirs["peak_rss_mb"]
        results.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "results" / "vs_circuit_tracer.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
