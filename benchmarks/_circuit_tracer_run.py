"""Run circuit-tracer's attribution once (inside benchmarks/.venv-ct); used by vs_circuit_tracer.py.

    .venv-ct/bin/python _circuit_tracer_run.py MODEL_DIR TRANSCODER_DIR OUT.pt SETTINGS_JSON PROMPT

Loads the model with circuit-tracer's nnsight backend and mechscope's transcoder set from its
directory (circuit-tracer only reads a local set through a config whose paths are absolute), fixes
circuit-tracer's token vectors (its nnsight backend takes them from the raw embedding matrix and
misses Gemma's sqrt(d_model) embedding scale: token edges come out 25.3x too small), runs
``attribute`` and saves the graph's tensors. Prints one JSON line: attribution seconds, peak RSS
(after attribution, before scoring), its own replacement and completeness scores.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
import yaml
from circuit_tracer import attribute
from circuit_tracer.graph import compute_graph_scores
from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel
from circuit_tracer.utils.hf_utils import load_transcoders


def embedding_scale(hf_model) -> float:
    """What the embedding module multiplies its weight rows by (sqrt(d_model) on Gemma)."""
    embed = hf_model.get_input_embeddings()
    row = embed.weight[10].float()
    with torch.no_grad():
        out = embed(torch.tensor([10]))[0].float()
    return float(out @ row / (row @ row))


def peak_rss() -> float:
    """Peak RSS of this process image in MiB (``VmHWM``: ``ru_maxrss`` would carry the parent's
    peak across ``exec``); ``mechscope.memory.peak_rss_mb`` measures the same, but mechscope is not
    installed in circuit-tracer's virtualenv."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    model_dir, transcoder_dir, out, settings, prompt = sys.argv[1:6]
    settings = json.loads(settings)
    torch.set_num_threads(settings.get("threads", 2))
    dtype = getattr(torch, settings.get("dtype", "float32"))
    tc_dir = Path(transcoder_dir).resolve()
    config = yaml.safe_load((tc_dir / "config.yaml").read_text())
    config["transcoders"] = [str(tc_dir / p) for p in config["transcoders"]]
    transcoders = load_transcoders(config, device=torch.device("cpu"), dtype=dtype)
    model = NNSightReplacementModel.from_pretrained_and_transcoders(model_dir, transcoders, device="cpu", dtype=dtype)
    scale = embedding_scale(model._model)
    if settings.get("fix_embedding_scale", True):
        model.embed_weight = model.embed_weight * scale
    start = time.perf_counter()
    graph = attribute(prompt, model, max_n_logits=settings["max_n_logits"],
                      desired_logit_prob=settings["desired_logit_prob"], batch_size=settings["batch_size"],
                      max_feature_nodes=settings.get("max_feature_nodes"))
    seconds = time.perf_counter() - start
    peak_rss_mb = peak_rss()  # before scoring and saving
    replacement, completeness = compute_graph_scores(graph)
    torch.save({"adjacency": graph.adjacency_matrix, "active_features": graph.active_features,
                "selected_features": graph.selected_features, "input_tokens": graph.input_tokens,
                "logit_token_ids": torch.tensor([t.vocab_idx for t in graph.logit_targets]),
                "logit_probabilities": graph.logit_probabilities}, out)
    print(json.dumps({"attribution_seconds": seconds, "embedding_scale": scale,
                      "peak_rss_mb": peak_rss_mb, "scores": [float(replacement), float(completeness)]}))


if __name__ == "__main__":
    main()
