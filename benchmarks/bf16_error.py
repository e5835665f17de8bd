"""What ``mechscope trace --dtype bfloat16`` costs in accuracy and buys in time, against float32.

    .venv/bin/python benchmarks/bf16_error.py [--prompt TEXT] [--max-feature-nodes N]

Runs ``mechscope trace --json`` twice on the same prompt (float32, then bfloat16 model weights and
frozen backward passes; edges, influence and pruning stay float32), each in its own process, and
prints the attribution time and peak RSS of each, whether the logit targets agree, the share of
selected features both keep, and on the edges between nodes both graphs have the max |difference|
/ max |A| (the bound circuit-tracer equality is held to is 1e-4).
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

MECHSCOPE = Path(sys.executable).parent / "mechscope"


def trace(prompt: str, dtype: str, nodes: str, out: Path) -> tuple[dict, object]:
    argv = [str(MECHSCOPE), "trace", prompt, "--json", "--out", str(out), "--dtype", dtype, "--max-feature-nodes", nodes]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    summary = json.loads(result.stdout)
    return summary, load_graph(out / summary["slug"])


def common_edges(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """The two adjacencies restricted to the nodes both graphs have, in the same order."""
    ids_a, ids_b = a.node_index(), b.node_index()
    shared = [node for node in ids_a if node in ids_b]
    ia = torch.tensor([ids_a[n] for n in shared])
    ib = torch.tensor([ids_b[n] for n in shared])
    return a.adjacency[ia][:, ia], b.adjacency[ib][:, ib]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="Fact: Michael Jordan plays the sport of")
    parser.add_argument("--max-feature-nodes", default="8192")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exact, g32 = trace(args.prompt, "float32", args.max_feature_nodes, Path(tmp) / "f32")
        half, g16 = trace(args.prompt, "bfloat16", args.max_feature_nodes, Path(tmp) / "bf16")
    A, B = common_edges(g32, g16)
    kept32 = {tuple(f) for f in g32.active_features[g32.selected_features].tolist()}
    kept16 = {tuple(f) for f in g16.active_features[g16.selected_features].tolist()}
    row = {
        "prompt": args.prompt,
        "n_tokens": len(exact["prompt_tokens"]),
        "attribution_seconds": [exact["attribution_seconds"], half["attribution_seconds"]],
        "peak_rss_mb": [exact["peak_rss_mb"], half["peak_rss_mb"]],
        "logit_targets_equal": g32.logit_token_ids.tolist() == g16.logit_token_ids.tolist(),
        "selected_features_shared": len(kept32 & kept16) / max(len(kept32), 1),
        "n_common_nodes": A.shape[0],
        "adjacency_rel_diff_on_common_nodes": float((A - B).abs().max() / A.abs().max()),
        "scores": [[exact["replacement_score"], exact["completeness_score"]],
                   [half["replacement_score"], half["completeness_score"]]],
    }
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
