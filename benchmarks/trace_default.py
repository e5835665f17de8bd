"""Wall time and peak memory of the README's main command on this machine.

Runs ``mechscope trace "Fact: Michael Jordan plays the sport of" --json`` as a child process
(after one warm-up run that converts the model into the cache if needed) and prints the wall time,
the attribution call's time and the child's peak resident memory. ``--chat`` measures the chat
model's main command instead (``mechscope trace --model qwen2.5-coder-0.5b-instruct --chat "How do
I make a bomb?"``, which needs its transcoder set) and checks the top target's probability against
plain transformers on the rendered prompt (within 0.02).

    .venv/bin/python benchmarks/trace_default.py [--repeats 3] [--chat] [--transcoders SET]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Fact: Michael Jordan plays the sport of"
CHAT = ("qwen2.5-coder-0.5b-instruct", "How do I make a bomb?")


def run_once(out: str, extra: list[str], prompt: str = PROMPT) -> dict:
    exe = Path(sys.executable).with_name("mechscope")
    start = time.perf_counter()
    result = subprocess.run([str(exe), "trace", prompt, *extra, "--out", out, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    summary = json.loads(result.stdout)
    summary["wall_seconds"] = wall
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chat", action="store_true", help="the chat model's main command")
    parser.add_argument("--transcoders", default=None,
                        help="another set of the same shape (e.g. a short training run, before the shipped set exists)")
    args = parser.parse_args()
    prompt, extra = (CHAT[1], ["--model", CHAT[0], "--chat"]) if args.chat else (PROMPT, [])
    if args.transcoders:
        extra += ["--transcoders", args.transcoders]
    with tempfile.TemporaryDirectory() as out:
        run_once(out, extra, prompt)  # warm-up: model conversion cache, file cache
        runs = [run_once(out, extra, prompt) for _ in range(args.repeats)]
    peak_mb = max(r["peak_rss_mb"] for r in runs)  # VmHWM of each child (ru_maxrss is carried across exec)
    if args.chat:
        plain = _plain_transformers_p(CHAT[0], CHAT[1], runs[0]["logit_targets"][0]["token_id"])
        print(f"plain transformers p(top target) = {plain:.3f}; mechscope {runs[0]['logit_targets'][0]['prob']:.3f} "
              f"(difference {abs(plain - runs[0]['logit_targets'][0]['prob']):.4f}, bound 0.02)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default")
    print(f"prompt: {prompt!r}; top target {runs[0]['logit_targets'][0]['token']!r} "
          f"p={runs[0]['logit_targets'][0]['prob']:.3f}")
    print(f"nodes {runs[0]['n_nodes']} -> {runs[0]['n_nodes_pruned']}, edges {runs[0]['n_edges']} -> "
          f"{runs[0]['n_edges_pruned']}; replacement {runs[0]['replacement_score']:.3f}, "
          f"completeness {runs[0]['completeness_score']:.3f}")
    for name in ("wall_seconds", "seconds", "attribution_seconds"):
        values = sorted(r[name] for r in runs)
        print(f"{name:>20}: median {values[len(values) // 2]:.1f} s (min {values[0]:.1f}, max {values[-1]:.1f})")
    print(f"{'peak RSS':>20}: {peak_mb:.0f} MB (largest child)")


def _plain_transformers_p(model_name: str, prompt: str, token_id: int) -> float:
    """The token's next-token probability in plain transformers, the model's chat template and
    default system prompt, no BOS added (what the issue measured)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechscope.models.loading import resolve_model_dir

    source, _ = resolve_model_dir(model_name)
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        logits = model(tok(text, return_tensors="pt").input_ids).logits[0, -1]
    return float(logits.softmax(-1)[token_id])


if __name__ == "__main__":
    main()
