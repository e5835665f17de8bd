"""Load check of the graph explorer: concurrent clients against ``mechscope serve`` on 127.0.0.1.

Writes a synthetic attribution graph of about ``--graph-mb`` MB (default 5; schema-valid, the size
of a pruned graph of a ~100-token prompt) and a feature store for its features, starts
``mechscope serve`` in a child process, and runs ``--clients`` concurrent clients (httpx, one
keep-alive connection each) for ``--seconds`` in two scenarios:

- ``graph``: every client fetches the whole graph JSON again and again;
- ``browse``: what a browser does per visit: the page, its script and style, the graph listing,
  the graph, then 20 feature cards (hovering over nodes).

Any response that is not 200 with the full body, or any connection error, counts as an error.
Prints requests/s, p50/p99 latency per request kind and the error count; ``--json`` also writes
``benchmarks/results/serve_load.json``.

    .venv/bin/python benchmarks/serve_load.py [--clients 50] [--seconds 30] [--graph-mb 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from mechscope.export.schema import validate_neuronpedia
from mechscope.features.store import write_store
from mechscope.node_ids import cantor_pair

N_LAYERS, N_POS, SCAN = 18, 100, "load-test-set"


def synthetic_graph(target_bytes: int, seed: int = 0) -> tuple[dict, list[tuple[int, int]]]:
    """A valid exchange graph of about ``target_bytes`` (edges added until the size is reached) and
    its ``(layer, feature)`` pairs."""
    rng = random.Random(seed)
    nodes = [{"node_id": f"E_{1000 + p}_{p}", "feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
              "jsNodeId": f"E_{1000 + p}-{p}", "clerp": f"Embedding 'token{p}'", "influence": None,
              "activation": None} for p in range(N_POS)]
    features = sorted({(rng.randrange(N_LAYERS), rng.randrange(16384)) for _ in range(2000)})
    for layer, feature in features:
        pos = rng.randrange(N_POS)
        nodes.append({"node_id": f"{layer}_{feature}_{pos}", "feature": cantor_pair(layer, feature),
                      "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
                      "jsNodeId": f"{layer}_{feature}-0", "clerp": "", "influence": rng.random() * 0.8,
                      "activation": rng.random() * 5})
    nodes += [{"node_id": f"{N_LAYERS + 1}_{t}_{N_POS - 1}", "feature": t, "layer": str(N_LAYERS + 1),
               "ctx_idx": N_POS - 1, "feature_type": "logit", "jsNodeId": f"L_{t}-{N_POS - 1}",
               "clerp": f'Output "t{t}"', "influence": 1.0, "activation": None} for t in range(10)]
    ids = [n["node_id"] for n in nodes]
    links, size = [], len(json.dumps(nodes))
    while size < target_bytes:
        link = {"source": rng.choice(ids), "target": rng.choice(ids), "weight": rng.gauss(0, 0.1)}
        links.append(link)
        size += len(json.dumps(link)) + 2
    graph = {"metadata": {"slug": "load", "scan": SCAN, "prompt_tokens": [f"token{p}" for p in range(N_POS)],
                          "prompt": "synthetic load-test graph"},
             "qParams": {"pinnedIds": [], "supernodes": []}, "nodes": nodes, "links": links}
    validate_neuronpedia(graph)
    return graph, features


def synthetic_store(path: Path, features: list[tuple[int, int]]) -> None:
    """A store with a dashboard (5 top examples of 32 tokens) for every feature of the graph."""
    n, window, per = len(features), 32, 5
    rng = np.random.default_rng(0)
    stats = {"layer": np.array([f[0] for f in features]), "feature": np.array([f[1] for f in features]),
             "active": np.full(n, 100), "density": rng.random(n) * 0.01, "max_value": np.full(n, 5.0),
             "hist": np.ones((n, 32), int)}
    examples = {"layer": np.repeat(stats["layer"], per), "feature": np.repeat(stats["feature"], per),
                "kind": np.array(["top"] * n * per), "interval": np.full(n * per, -1),
                "rank": np.tile(np.arange(per), n), "sequence": np.arange(n * per) % 100,
                "start": np.zeros(n * per, int), "position": np.full(n * per, 16),
                "value": rng.random(n * per) * 5, "acts": rng.random((n * per, window)) * 5}
    sequences = {s: [f" word{s}_{i}" for i in range(window)] for s in range(100)}
    logits = {"pos": [[[f" up{i}", 0.5]] * 10 for i in range(n)], "neg": [[[f" down{i}", -0.5]] * 10 for i in range(n)]}
    write_store(path, {"transcoders": SCAN, "hist_edges": list(range(33)), "n_intervals": 0, "window": window},
                stats, examples, sequences, logits)


async def client(base: str, scenario: str, features, deadline: float, record) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        while time.perf_counter() < deadline:
            if scenario == "graph":
                paths = [("graph", "/api/graphs/load.json")]
            else:
                hovered = random.sample(features, 20)
                paths = [("page", "/"), ("asset", "/static/app.js"), ("asset", "/static/style.css"),
                         ("listing", "/api/graphs"), ("graph", "/api/graphs/load.json")]
                paths += [("card", f"/api/features/{layer}/{feature}?scan={SCAN}") for layer, feature in hovered]
            for kind, path in paths:
                start = time.perf_counter()
                try:
                    response = await http.get(path)
                    ok = response.status_code == 200 and len(response.content) == int(response.headers["content-length"])
                except httpx.HTTPError:
                    ok, response = False, None
                record(kind, time.perf_counter() - start, ok, len(response.content) if response is not None else 0)


async def run_scenario(base: str, scenario: str, clients: int, seconds: float, features) -> dict:
    latencies: dict[str, list[float]] = {}
    errors, n_bytes = 0, 0

    def record(kind, seconds_taken, ok, size):
        nonlocal errors, n_bytes
        latencies.setdefault(kind, []).append(seconds_taken)
        errors += not ok
        n_bytes += size

    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(client(base, scenario, features, deadline, record) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    total = sum(len(v) for v in latencies.values())
    return {
        "scenario": scenario, "clients": clients, "seconds": elapsed, "requests": total, "errors": errors,
        "requests_per_s": total / elapsed, "mb_per_s": n_bytes / elapsed / 1e6,
        "latency_ms": {kind: {"n": len(v), "p50": float(np.percentile(v, 50) * 1e3),
                              "p99": float(np.percentile(v, 99) * 1e3)} for kind, v in latencies.items()},
    }


def wait_for(base: str, process: subprocess.Popen) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit(f"mechscope serve exited: {process.stderr.read()}")
        try:
            if httpx.get(base + "/api/graphs", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("mechscope serve did not answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--graph-mb", type=float, default=5)
    parser.add_argument("--scenarios", default="graph,browse")
    parser.add_argument("--json", action="store_true", help="also write benchmarks/results/serve_load.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "graphs"
        root.mkdir()
        graph, features = synthetic_graph(int(args.graph_mb * 1e6))
        (root / "load.json").write_text(json.dumps(graph))
        synthetic_store(Path(tmp) / "store.sqlite", features)
        graph_mb = (root / "load.json").stat().st_size / 1e6
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        process = subprocess.Popen([sys.executable, "-m", "mechscope", "serve", str(root), "--port", str(port),
                                    "--store", str(Path(tmp) / "store.sqlite")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(base, process)
            results = [asyncio.run(run_scenario(base, s, args.clients, args.seconds, features))
                       for s in args.scenarios.split(",")]
        finally:
            process.terminate()
            process.wait(timeout=10)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; server and clients "
          f"share them; graph {graph_mb:.2f} MB ({len(graph['nodes'])} nodes, {len(graph['links'])} edges)")
    for r in results:
        kinds = ", ".join(f"{k} p50 {v['p50']:.1f} ms / p99 {v['p99']:.1f} ms" for k, v in r["latency_ms"].items())
        print(f"{r['scenario']}: {r['clients']} clients, {r['seconds']:.1f} s, {r['requests']} requests, "
              f"{r['errors']} errors, {r['requests_per_s']:.1f} req/s, {r['mb_per_s']:.0f} MB/s; {kinds}")
    if args.json:
        out = Path(__file__).parent / "results" / "serve_load.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"graph_mb": graph_mb, "results": results}, indent=1))


if __name__ == "__main__":
    main()
