"""Attribution time of the README's main command on a quiet machine and with one core kept busy.

Runs ``mechscope trace "Fact: Michael Jordan plays the sport of" --json`` as child processes (the
model already converted into the cache) and reads each one's ``attribution_seconds``, in two
threading settings:

- ``mechscope``: the default (threads chosen from the idle cores at start, :mod:`mechscope.threads`);
- ``one per core``: what PyTorch does on its own (one thread per core), set with ``MECHSCOPE_THREADS=<cores>``;

each on the quiet machine and beside a busy loop (a helper process at normal priority that keeps one
core busy). Prints the medians and the busy / quiet ratio of each setting; a ratio of about 2 on two
cores is the CPU the busy loop took, more is threads waiting for each other.

    .venv/bin/python benchmarks/busy_machine.py [--repeats 3]

Run it on an otherwise quiet machine (pause long jobs: ``kill -STOP PID`` / ``kill -CONT PID``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "Fact: Michael Jordan plays the sport of"


def attribution_seconds(env: dict[str, str]) -> float:
    exe = Path(sys.executable).with_name("mechscope")
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([str(exe), "trace", PROMPT, "--json", "--out", out], env=env, capture_output=True,
                              text=True, check=True)
    return float(json.loads(done.stdout)["attribution_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MECHSCOPE_THREADS", "OMP_WAIT_POLICY")}
    settings = {"mechscope": base, "one per core": {**base, "MECHSCOPE_THREADS": str(cores)}}
    attribution_seconds(base)  # warm-up: converts the model into the cache if needed
    results: dict[str, dict[str, float]] = {}
    for machine in ("quiet", "busy"):
        helper = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if machine == "busy" else None
        try:
            for name, env in settings.items():
                times = [attribution_seconds(env) for _ in range(args.repeats)]
                results.setdefault(name, {})[machine] = statistics.median(times)
                print(f"{machine:>5} {name:<13} attribution {statistics.median(times):6.1f} s "
                      f"(runs: {', '.join(f'{t:.1f}' for t in times)})", flush=True)
        finally:
            if helper is not None:
                helper.kill()
                helper.wait()
    print(f"\n{cores} cores; median of {args.repeats} runs each")
    print(f"{'setting':<13} {'quiet s':>8} {'busy s':>8} {'busy/quiet':>10}")
    for name, row in results.items():
        print(f"{name:<13} {row['quiet']:8.1f} {row['busy']:8.1f} {row['busy'] / row['quiet']:10.2f}")


if __name__ == "__main__":
    main()
