"""Wall time and peak memory of the README's main command on this machine.

Runs ``mechscope trace "Fact: Michael Jordan plays the sport of" --json`` as a child process
(after one warm-up run that converts the model into the cache if needed) and prints the wall time,
the attribution call's time and the child's peak resident memory.

    .venv/bin/python benchmarks/trace_default.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Fact: Michael Jordan plays the sport of"


def run_once(out: str) -> dict:
    exe = Path(sys.executable).with_name("mechscope")
    start = time.perf_counter()
    result = subprocess.run([str(exe), "trace", PROMPT, "--out", out, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    summary = json.loads(result.stdout)
    summary["wall_seconds"] = wall
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        run_once(out)  # warm-up: model conversion cache, file cache
        runs = [run_once(out) for _ in range(args.repeats)]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default")
    print(f"prompt: {PROMPT!r}; top target {runs[0]['logit_targets'][0]['token']!r} "
          f"p={runs[0]['logit_targets'][0]['prob']:.3f}")
    print(f"nodes {runs[0]['n_nodes']} -> {runs[0]['n_nodes_pruned']}, edges {runs[0]['n_edges']} -> "
          f"{runs[0]['n_edges_pruned']}; replacement {runs[0]['replacement_score']:.3f}, "
          f"completeness {runs[0]['completeness_score']:.3f}")
    for name in ("wall_seconds", "seconds", "attribution_seconds"):
        values = sorted(r[name] for r in runs)
        print(f"{name:>20}: median {values[len(values) // 2]:.1f} s (min {values[0]:.1f}, max {values[-1]:.1f})")
    print(f"{'peak RSS':>20}: {peak_mb:.0f} MB (largest child)")


if __name__ == "__main__":
    main()
