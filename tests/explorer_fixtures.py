"""A small graph JSON and feature store for the graph explorer's tests (no model needed)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np

from mechscope.features.store import write_store
from mechscope.node_ids import cantor_pair

SCAN = "tiny-set-v1"
PROMPT_TOKENS = ["<bos>", "The", " capital", " of", " Texas", " is"]
N_LAYERS = 3
#: (layer, feature, pos, activation, influence, label)
FEATURES = [(0, 5, 4, 2.5, 0.10, "Texas"), (1, 7, 4, 1.5, 0.25, "Texas (L1)"), (1, 9, 2, 0.8, 0.55, ""),
            (2, 3, 5, 3.0, 0.05, "say a capital"), (2, 4, 5, 0.5, 0.75, "")]
#: the feature-store windows: sequence -> tokens
SEQUENCES = {0: ["Austin", " is", " in", " Texas", ",", " near", " Dallas", "."],
             1: ["the", " capital", " city", " of", " the", " state", " is", " Austin"]}


def make_graph_json(slug: str = "texas") -> dict:
    """A valid exchange graph: 6 embeddings, 5 features, 2 errors, 2 logits and signed edges."""
    nodes = []
    for pos, token in enumerate(PROMPT_TOKENS):
        nodes.append({"node_id": f"E_{100 + pos}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                      "feature_type": "embedding", "jsNodeId": f"E_{100 + pos}-{pos}", "clerp": f"Embedding {token!r}",
                      "influence": None, "activation": None, "token_prob": 0.0, "is_target_logit": False})
    for layer, feature, pos, activation, influence, label in FEATURES:
        nodes.append({"node_id": f"{layer}_{feature}_{pos}", "feature": cantor_pair(layer, feature), "layer": str(layer),
                      "ctx_idx": pos, "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{feature}-0",
                      "clerp": label, "influence": influence, "activation": activation, "token_prob": 0.0,
                      "is_target_logit": False, "direct_effect": 0.1 * feature - 0.45, "total_effect": -0.25 * feature})
    for layer, pos in ((0, 4), (2, 5)):
        nodes.append({"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                      "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{pos}-0",
                      "clerp": f"error at layer {layer}", "influence": 0.6, "activation": None,
                      "token_prob": 0.0, "is_target_logit": False})
    for k, (token_id, token, prob) in enumerate(((7, " Austin", 0.6), (8, " Dallas", 0.1))):
        nodes.append({"node_id": f"{N_LAYERS + 1}_{token_id}_5", "feature": token_id, "layer": str(N_LAYERS + 1),
                      "ctx_idx": 5, "feature_type": "logit", "jsNodeId": f"L_{token_id}-5",
                      "clerp": f'Output "{token}" (p={prob:.3f})', "influence": 1.0, "activation": None,
                      "token_prob": prob, "is_target_logit": k == 0})
    edges = [("E_104_4", "0_5_4", 1.2), ("E_104_4", "1_7_4", 0.7), ("0_5_4", "1_7_4", 0.9), ("E_102_2", "1_9_2", 0.4),
             ("1_7_4", "2_3_5", 1.1), ("0_5_4", "2_3_5", 0.6), ("1_9_2", "2_3_5", 0.3), ("0_-1_4", "2_3_5", -0.2),
             ("2_3_5", "4_7_5", 1.5), ("2_4_5", "4_7_5", -0.4), ("2_-1_5", "4_7_5", 0.3), ("1_7_4", "4_8_5", -0.6),
             ("E_105_5", "2_4_5", 0.5)]
    return {
        "metadata": {"slug": slug, "scan": SCAN, "prompt_tokens": list(PROMPT_TOKENS),
                     "prompt": "".join(PROMPT_TOKENS[1:]), "node_threshold": 0.8, "effects_target": " Austin",
                     "info": {"generator": {"name": "mechscope", "version": "test"}}},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": [{"source": s, "target": t, "weight": w} for s, t, w in edges],
    }


def make_store(path) -> None:
    """A feature store for :data:`SCAN` holding the graph's features, with two top examples each whose
    activation peaks at the example's own position."""
    n = len(FEATURES)
    features = {"layer": np.array([f[0] for f in FEATURES]), "feature": np.array([f[1] for f in FEATURES]),
                "active": np.arange(1, n + 1) * 10, "density": np.linspace(0.001, 0.01, n),
                "max_value": np.array([f[3] * 2 for f in FEATURES]), "hist": np.ones((n, 4), int)}
    rows = [(layer, feature, sequence, position, value * 2 * (1 - 0.25 * rank))
            for layer, feature, _, value, _, _ in FEATURES for rank, (sequence, position) in enumerate(((0, 3), (1, 7)))]
    acts = np.zeros((len(rows), 8))
    for i, (_, _, _, position, value) in enumerate(rows):
        acts[i, position] = value
        acts[i, position - 1] = value / 2
    examples = {"layer": np.array([r[0] for r in rows]), "feature": np.array([r[1] for r in rows]),
                "kind": np.array(["top"] * len(rows)), "interval": np.full(len(rows), -1),
                "rank": np.array([i % 2 for i in range(len(rows))]), "sequence": np.array([r[2] for r in rows]),
                "start": np.zeros(len(rows), int), "position": np.array([r[3] for r in rows]),
                "value": np.array([r[4] for r in rows]), "acts": acts}
    logits = {"pos": [[[" Austin", 0.9 - 0.1 * i], [" Texas", 0.5]] for i in range(n)],
              "neg": [[[" Paris", -0.7], [" London", -0.3 - 0.01 * i]] for i in range(n)]}
    write_store(path, {"transcoders": SCAN, "hist_edges": [0, 1, 2, 3, 4], "n_intervals": 0, "window": 8},
                features, examples, SEQUENCES, logits)


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_command(root, *options: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, int, dict]]:
    """Run the real ``mechscope serve ROOT --port P OPTIONS`` in a subprocess; yield it, its port and
    its first answer to ``GET /api/graphs`` once it serves; stop it afterwards."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mechscope", "serve", str(root), "--port", str(port), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                con = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                con.request("GET", "/api/graphs")
                listing = json.loads(con.getresponse().read())
                break
            except ConnectionRefusedError:
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "mechscope serve did not start"
                time.sleep(0.1)
        yield process, port, listing
    finally:
        process.terminate()
        process.wait(timeout=10)
