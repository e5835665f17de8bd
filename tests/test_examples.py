"""The case-study scripts under examples/ run end to end on tiny random models (so they keep up with
the API; their figures on the real models are in the README)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import make_tiny_chat_adapter, make_tiny_transcoders

from mechscope.export.schema import validate_neuronpedia

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_refusal_case_study_runs_on_a_tiny_chat_model(tmp_path, monkeypatch, capsys):
    from mechscope.replacement.replacement_model import ReplacementModel

    refusal = _load("refusal")
    chat = make_tiny_chat_adapter()  # in memory: saved and reloaded, its character tokenizer becomes Qwen2's class
    # the character tokenizer has no " basketball" token: single characters instead
    monkeypatch.setattr(refusal, "ENTITY_TARGET", "b")
    monkeypatch.setattr(refusal, "LATER_DIFF", ("m", "d"))
    figures = refusal.graph_part(chat, ReplacementModel(chat, make_tiny_transcoders(chat, skip=True)), 3, 0,
                                 tmp_path / "graphs")
    out = capsys.readouterr().out
    for heading in ("1. graphs", "2. supernodes", "3. graph diffs", "4. interventions", "5. a later token", "6. a known"):
        assert heading in out
    assert set(figures["conditions"]) == {"direct, clean", "direct, suppress bomb x-10", "direct, suppress make x-10",
                                          "direct, zero assistant refusing", "bread, clean", "bread, inject harmful request"}
    assert all(c["n"] == 3 and 0 <= c["rate"] <= 1 for c in figures["conditions"].values())
    graphs = sorted((tmp_path / "graphs").glob("refusal-*.json"))
    assert len(graphs) == 9  # six to "I", the later token, two entities
    for path in graphs:
        data = json.loads(path.read_text())
        validate_neuronpedia(data)
        assert "<|im_start|>" in data["metadata"]["prompt"]
    assert figures["graphs"] == [str(p) for p in graphs]
