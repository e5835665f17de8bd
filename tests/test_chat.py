"""Chat-formatted prompts on a tiny random Qwen2 chat model with a ChatML template (conftest).

Rendering equals the tokenizer's own ``apply_chat_template``; the assistant prefix and whole
conversations land where they should; the science holds on a chat-formatted prompt; bad chat
input exits with code 2 and writes nothing.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_chat_adapter, make_tiny_transcoders
from test_attribution import (
    check_edges_predict_doubling_a_source,
    check_preactivation_is_sum_of_edges_plus_bias,
    check_replacement_reproduces_logits,
)
from test_cli import run

from mechscope.errors import BadInputError
from mechscope.graph.io import load_graph
from mechscope.models.chat import build_chat_prompt, chat_metadata, check_chat_options, load_messages
from mechscope.replacement.replacement_model import ReplacementModel
from mechscope.transcoders.io import save_transcoder_set


@pytest.fixture(scope="module")
def chat_adapter():
    return make_tiny_chat_adapter()


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory, chat_adapter):
    root = tmp_path_factory.mktemp("tiny-chat")
    chat_adapter.hf.save_pretrained(root / "model")
    chat_adapter.tokenizer.save_pretrained(root / "model")
    save_transcoder_set(make_tiny_transcoders(chat_adapter, skip=True), root / "tcs")
    return root


def test_chat_rendering_equals_apply_chat_template(chat_adapter):
    tok = chat_adapter.tokenizer
    chat = build_chat_prompt(tok, "a cat")
    expected = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True)
    assert chat.text == expected and expected.startswith("<|im_start|>system\nBe kind.")  # the default system prompt
    system = build_chat_prompt(tok, "a cat", system="Be brief.")
    assert system.text == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a cat"}], tokenize=False,
        add_generation_prompt=True)
    assert "Be kind." not in system.text
    prefixed = build_chat_prompt(tok, "a cat", assistant_prefix="I do")
    assert prefixed.text == expected + "I do"


def test_token_roles_mark_the_users_words_and_the_assistant_prefix(chat_adapter):
    tok = chat_adapter.tokenizer
    chat = build_chat_prompt(tok, "a cat", assistant_prefix="I do")
    ids = chat_adapter.tokenize(chat.text)
    tokens = chat_adapter.token_strings(ids)
    roles = chat_metadata(tok, chat, ids)["token_roles"]
    # the template opens with its own start token, so no BOS is added (the model reads what its template writes)
    assert len(roles) == len(ids) and tokens[0] == "<|im_start|>" and roles[0] == "template"
    assert chat_adapter.has_bos(ids)  # a start token: position 0 gets no nodes
    assert "".join(t for t, r in zip(tokens, roles) if r == "user") == "a cat"
    assert "".join(t for t, r in zip(tokens, roles) if r == "assistant") == "I do"
    assert tokens[-4:] == ["I", " ", "d", "o"] and roles[-5] == "template"  # the header's newline before it
    user_positions = [i for i, r in enumerate(roles) if r == "user"]
    assert "".join(tokens[user_positions[0] - 5 : user_positions[0]]) == "user\n"


def test_messages_continue_a_final_assistant_turn(chat_adapter, tmp_path):
    tok = chat_adapter.tokenizer
    messages = [{"role": "user", "content": "a cat"}, {"role": "assistant", "content": "I do not"},
                {"role": "user", "content": "why"}]
    file = tmp_path / "m.json"
    file.write_text(json.dumps(messages))
    chat = build_chat_prompt(tok, messages=load_messages(file))
    assert chat.text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    continued = build_chat_prompt(tok, messages=messages[:2])
    assert continued.text.endswith("<|im_start|>assistant\nI do not")  # no end-of-turn: the reply goes on
    ids = chat_adapter.tokenize(continued.text)
    roles = chat_metadata(tok, continued, ids)["token_roles"]
    assert "".join(t for t, r in zip(chat_adapter.token_strings(ids), roles) if r == "assistant") == "I do not"


@pytest.mark.parametrize("check", [check_replacement_reproduces_logits, check_preactivation_is_sum_of_edges_plus_bias,
                                   check_edges_predict_doubling_a_source])
def test_the_science_holds_on_a_chat_prompt(chat_adapter, make_tiny_transcoders, check):
    rm = ReplacementModel(chat_adapter, make_tiny_transcoders(chat_adapter, skip=True))
    check(rm, build_chat_prompt(chat_adapter.tokenizer, "a cat", assistant_prefix="I").text)


def test_a_written_bos_is_not_doubled(chat_adapter):
    ids = chat_adapter.tokenize("<bos>a cat")
    assert chat_adapter.token_strings(ids)[:2] == ["<bos>", "a"]


def test_trace_chat_records_messages_and_roles(chat_dirs, tmp_path, capsys):
    out = tmp_path / "graphs"
    code, stdout, err = run(["trace", "a cat", "--chat", "--assistant-prefix", "I", "--model", str(chat_dirs / "model"),
                             "--transcoders", str(chat_dirs / "tcs"), "--out", str(out), "--json",
                             "--max-feature-nodes", "20"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["slug"] == "a-cat-i-chat"
    data = json.loads((out / "a-cat-i-chat.json").read_text())
    chat = data["metadata"]["chat"]
    assert chat["messages"] == [{"role": "user", "content": "a cat"}] and chat["assistant_prefix"] == "I"
    assert data["metadata"]["prompt"] == chat["rendered"] and chat["rendered"].endswith("assistant\nI")
    assert len(chat["token_roles"]) == len(data["metadata"]["prompt_tokens"])
    assert load_graph(out / "a-cat-i-chat").config["chat"]["rendered"] == chat["rendered"]


@pytest.mark.parametrize("case", ["no-template", "prefix-without-chat", "system-without-chat", "bad-json",
                                  "bad-role", "not-a-list", "messages-and-prompt", "missing-file"])
def test_bad_chat_input_exits_2_and_writes_nothing(case, chat_dirs, tmp_path, capsys):
    from conftest import make_tiny_adapter

    model = chat_dirs / "model"
    if case == "no-template":  # a model whose tokenizer has no chat template
        plain = make_tiny_adapter("qwen2")
        model = tmp_path / "plain"
        plain.hf.save_pretrained(model)
        plain.tokenizer.save_pretrained(model)
    messages = tmp_path / "m.json"
    messages.write_text({"bad-json": "[{", "bad-role": json.dumps([{"role": "robot", "content": "hi"}]),
                         "not-a-list": json.dumps({"role": "user", "content": "hi"})}.get(case, "[]"))
    extra = {"no-template": ["a cat", "--chat"], "prefix-without-chat": ["a cat", "--assistant-prefix", "I"],
             "system-without-chat": ["a cat", "--system", "Be brief."], "bad-json": ["--messages", str(messages)],
             "bad-role": ["--messages", str(messages)], "not-a-list": ["--messages", str(messages)],
             "messages-and-prompt": ["a cat", "--messages", str(messages)],
             "missing-file": ["--messages", str(tmp_path / "none.json")]}[case]
    out = tmp_path / "graphs"
    code, _, err = run(["trace", *extra, "--model", str(model), "--transcoders", str(chat_dirs / "tcs"),
                        "--out", str(out)], capsys)
    assert code == 2, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    expected = {"no-template": "no chat template", "prefix-without-chat": "--assistant-prefix needs --chat",
                "system-without-chat": "--system needs --chat", "bad-json": "not valid JSON", "bad-role": "'robot'",
                "not-a-list": "non-empty JSON list", "messages-and-prompt": "leave out PROMPT",
                "missing-file": "does not exist"}[case]
    assert expected in err
    assert not out.exists()


def test_check_chat_options_before_loading():
    with pytest.raises(BadInputError, match="--assistant-prefix needs --chat"):
        check_chat_options("hi", False, None, "I", None)
    check_chat_options("hi", True, "sys", "I", None)  # a valid combination passes


def test_gemma_style_chat_text_without_bos_still_gets_one():
    """A tokenizer that adds BOS itself (Gemma) keeps adding it before a template token."""
    from conftest import make_tiny_adapter

    adapter = make_tiny_adapter("gemma3")
    adapter.tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>"]})
    ids = adapter.tokenize("<start_of_turn>user")
    assert adapter.token_strings(ids)[:2] == ["<bos>", "<start_of_turn>"]
    assert adapter.token_strings(adapter.tokenize("<bos><start_of_turn>user"))[:2] == ["<bos>", "<start_of_turn>"]


@pytest.mark.parametrize("content", ["a", "user", "Be", "assistant"])
def test_short_user_words_that_also_occur_in_the_template_are_marked_user(chat_adapter, content):
    chat = build_chat_prompt(chat_adapter.tokenizer, content)
    ids = chat_adapter.tokenize(chat.text)
    roles = chat_metadata(chat_adapter.tokenizer, chat, ids)["token_roles"]
    tokens = chat_adapter.token_strings(ids)
    assert "".join(t for t, r in zip(tokens, roles) if r == "user") == content
    user_at = roles.index("user")
    assert "".join(tokens[user_at - 5 : user_at]) == "user\n"  # right after the user header
