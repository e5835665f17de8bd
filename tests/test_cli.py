"""The ``mechscope trace`` contract on a tiny model saved to disk: JSON keys, files, bad input.

Bad input must give a clear message, exit code 2 and no output files.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_adapter, make_tiny_set, make_tiny_transcoders

from mechscope.cli.main import main
from mechscope.export.neuronpedia import validate_neuronpedia
from mechscope.graph.io import load_graph
from mechscope.transcoders.io import save_transcoder_set

JSON_KEYS = {"graph_path", "slug", "model", "transcoders", "prompt_tokens", "logit_targets", "n_nodes",
             "n_edges", "n_nodes_pruned", "n_edges_pruned", "replacement_score", "completeness_score",
             "seconds", "attribution_seconds", "peak_rss_mb"}


#: the folder of ``tiny_dirs`` holding the llama's set of each kind, ``make_tiny_set(llama, kind, skip=True)``
SET_DIRS = {"per-layer": "tcs", "cross-layer": "clt"}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    adapter = make_tiny_adapter("llama")
    adapter.hf.save_pretrained(root / "model")
    adapter.tokenizer.save_pretrained(root / "model")
    for kind, name in SET_DIRS.items():
        save_transcoder_set(make_tiny_set(adapter, kind, skip=True), root / name)
    other = make_tiny_adapter("gemma3")  # 3 layers: does not fit the 2-layer llama
    save_transcoder_set(make_tiny_transcoders(other), root / "tcs-gemma3")
    return root


def run(argv, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def trace_args(tiny_dirs, out, *extra, prompt="a cat sat", kind="per-layer"):
    return ["trace", prompt, "--model", str(tiny_dirs / "model"), "--transcoders", str(tiny_dirs / SET_DIRS[kind]),
            "--out", str(out), *extra]


def test_trace_json_contract(tiny_dirs, tmp_path, capsys):
    code, out, err = run(trace_args(tiny_dirs, tmp_path / "graphs", "--json", "--max-feature-nodes", "30"), capsys)
    assert code == 0, err
    summary = json.loads(out)  # exactly one JSON object on stdout
    assert set(summary) == JSON_KEYS
    assert summary["slug"] == "a-cat-sat"
    assert summary["prompt_tokens"][0] == "<bos>"
    assert summary["n_nodes_pruned"] <= summary["n_nodes"] and summary["n_edges_pruned"] <= summary["n_edges"]
    assert 0 <= summary["replacement_score"] <= 1 and 0 <= summary["completeness_score"] <= 1
    probs = [t["prob"] for t in summary["logit_targets"]]
    assert probs == sorted(probs, reverse=True) and set(summary["logit_targets"][0]) == {"token", "token_id", "prob"}
    data = json.loads((tmp_path / "graphs" / "a-cat-sat.json").read_text())
    validate_neuronpedia(data)
    assert summary["graph_path"] == str(tmp_path / "graphs" / "a-cat-sat.json")
    graph = load_graph(tmp_path / "graphs" / "a-cat-sat")
    assert graph.n_nodes == summary["n_nodes"] and graph.n_features == 30
    code, out, err = run(trace_args(tiny_dirs, tmp_path / "all", "--json", "--max-feature-nodes", "all"), capsys)
    assert code == 0, err
    assert load_graph(tmp_path / "all" / "a-cat-sat").n_features == len(graph.active_features) > 30
    for bad in ("-3", "many"):
        code, out, err = run(trace_args(tiny_dirs, tmp_path / "bad", "--max-feature-nodes", bad), capsys)
        assert code == 2 and bad in err and "'all'" in err and not (tmp_path / "bad").exists()
    code, out, err = run(trace_args(tiny_dirs, tmp_path / "bf16", "--json", "--dtype", "bfloat16"), capsys)
    assert code == 0, err
    assert load_graph(tmp_path / "bf16" / "a-cat-sat").config["dtype"] == "bfloat16"
    code, out, err = run(trace_args(tiny_dirs, tmp_path / "bad", "--dtype", "int8"), capsys)
    assert code == 2 and "int8" in err and "bfloat16" in err and not (tmp_path / "bad").exists()


def test_trace_summary_and_no_prune(tiny_dirs, tmp_path, capsys):
    code, out, err = run(trace_args(tiny_dirs, tmp_path, "--no-prune", "--target", "t", "--target", "a"), capsys)
    assert code == 0, err
    assert "replacement score" in out and "most influential" not in out
    assert f"(explore it: mechscope serve {tmp_path})" in out
    data = json.loads((tmp_path / "a-cat-sat.json").read_text())
    assert [n["clerp"] for n in data["nodes"] if n["feature_type"] == "logit"][0].startswith('Output "t"')
    graph = load_graph(tmp_path / "a-cat-sat")
    assert len(data["nodes"]) == graph.n_nodes


@pytest.mark.parametrize(
    "argv_fn, message",
    [
        (lambda d, o: trace_args(d, o, prompt="   "), "prompt is empty"),
        (lambda d, o: trace_args(d, o, "--max-prompt-tokens", "4"), "over the limit of 4"),
        (lambda d, o: trace_args(d, o, "--target", "ca"), "not a single token"),
        (lambda d, o: trace_args(d, o, "--node-threshold", "2"), "--node-threshold"),
        (lambda d, o: trace_args(d, o, "--batch-size", "0"), "batch_size"),
        (lambda d, o: trace_args(d, o, "--edge-rows-gb", "0"), "--edge-rows-gb must be > 0"),
        (lambda d, o: ["trace", "x", "--model", str(d / "model"), "--transcoders", "no-such-set", "--out", str(o)],
         "unknown transcoder set 'no-such-set'"),
        (lambda d, o: ["trace", "x", "--model", str(d / "model"), "--transcoders", str(d / "tcs-gemma3"),
                       "--out", str(o)], "3 layers"),
        (lambda d, o: ["trace", "x", "--model", "./no/such/dir", "--out", str(o)], "does not exist"),
    ],
    ids=["empty", "too-long", "multi-token-target", "threshold", "batch", "edge-rows-gb", "unknown-set", "mismatch",
         "bad-path"],
)
def test_bad_input_exits_2_without_output(tiny_dirs, tmp_path, capsys, argv_fn, message):
    out_dir = tmp_path / "out"
    code, out, err = run(argv_fn(tiny_dirs, out_dir), capsys)
    assert code == 2
    assert message in err and err.startswith("error: ")
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_corrupt_transcoder_file(tiny_dirs, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs / "tcs", broken)
    layer = broken / "layer_1.safetensors"
    layer.write_bytes(layer.read_bytes()[: layer.stat().st_size // 2])
    code, _, err = run(["trace", "x", "--model", str(tiny_dirs / "model"), "--transcoders", str(broken),
                        "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "truncated" in err
    assert not (tmp_path / "out").exists()


def test_unknown_model_name_lists_known_models(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["trace", "x", "--model", "no-such-model", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "unknown model 'no-such-model'" in err and "gemma-3-270m" in err and "smollm2-135m-instruct" in err


def test_the_serve_hint_names_the_command_as_it_can_be_run(tmp_path, monkeypatch):
    from mechscope.cli.trace import command_name

    exe = tmp_path / "venv" / "bin" / "mechscope"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [str(exe)])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert command_name() == "venv/bin/mechscope"  # not on PATH: the path it was started by
    monkeypatch.setenv("PATH", str(exe.parent))
    assert command_name() == "mechscope"


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run the mechscope command with stderr on a pseudo-terminal; returns (exit code, what it wrote there)."""
    import os
    import pty
    import subprocess
    import sys

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal 120 columns wide
    exe = os.path.join(os.path.dirname(sys.executable), "mechscope")
    proc = subprocess.Popen([exe, *argv], stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_long_commands_show_phases_on_a_terminal_only(tiny_dirs, tmp_path):
    import subprocess
    import sys

    args = trace_args(tiny_dirs, tmp_path / "g", "--max-feature-nodes", "20")[1:]
    code, terminal = _run_on_a_terminal(["trace", *args])
    assert code == 0, terminal
    for phase in ("s] loading", "s] clean run of", "active features;", "s] pruning and scores", "s] exporting"):
        assert phase in terminal, (phase, terminal)
    assert "attribution" in terminal  # the bar
    code, terminal = _run_on_a_terminal(["trace", *args, "--json"])
    assert code == 0 and "s] " not in terminal and "attribution" not in terminal, terminal
    exe = sys.executable.replace("python", "mechscope")
    piped = subprocess.run([exe, "trace", *args], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "s] " not in piped.stderr and "attribution:" not in piped.stderr, piped.stderr


def test_trace_and_intervene_take_a_logit_difference(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "g"
    code, stdout, err = run(trace_args(tiny_dirs, out, "--json", "--logit-diff", "t", "e", "--max-feature-nodes", "20"), capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert [t["token"] for t in summary["logit_targets"]] == ["t - e"]
    data = json.loads((out / "a-cat-sat.json").read_text())
    validate_neuronpedia(data)
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert [n["clerp"] for n in logits] == ['Logit difference "t" - "e"']
    node = next(n["node_id"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    code, stdout, err = run(["intervene", "--graph", str(out / "a-cat-sat.json"), "--model", str(tiny_dirs / "model"),
                             "--transcoders", str(tiny_dirs / "tcs"), "--zero", node, "--logit-diff", "t", "e", "--json"], capsys)
    assert code == 0, err
    diff = json.loads(stdout)["logit_diff"]
    assert diff["tokens"] == ["t", "e"] and diff["change"] == pytest.approx(diff["intervened"] - diff["clean"])
    code, _, err = run(trace_args(tiny_dirs, tmp_path / "bad", "--logit-diff", "t", "ee"), capsys)
    assert code == 2 and "not a single token" in err and not (tmp_path / "bad").exists()
