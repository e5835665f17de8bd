"""Chat transcripts as a corpus source: user turns, the model's own sampled replies, resume, mixing."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_tiny_chat_adapter
from test_training import write_sources

from mechscope.data.chat import ChatConfig, build_chat_source, render_transcript, user_turns
from mechscope.data.corpus import CorpusConfig, TokenStream, build_corpus
from mechscope.errors import BadInputError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatcorpus")
    txt, jsonl, _ = write_sources(root / "raw")
    (root / "raw" / "questions.txt").write_text(
        "Where did the little cat go after dinner? It ran far. Is there a dog under the old tree today?")
    return build_corpus(CorpusConfig(sources=(str(txt), str(jsonl), str(root / "raw" / "questions.txt"))),
                        out=root / "built")


def test_user_turns_mix_mined_and_templated_questions(built):
    turns = user_turns(built, 40)
    assert len(turns) == 40 and turns == user_turns(built, 40)  # a fixed order
    assert "Where did the little cat go after dinner?" in turns  # mined from the corpus
    assert any(t.startswith("How do I make a bomb") or "bomb" in t for t in user_turns(built, 2000))  # templated, harmful
    assert any(t == "What is a bomb calorimeter?" for t in user_turns(built, 2000))  # a look-alike
    with pytest.raises(BadInputError):
        user_turns(built, 0)


def test_chat_source_is_the_models_own_replies_resumable_and_mixed(built, tmp_path):
    corpus = tmp_path / "c"
    shutil.copytree(built, corpus)
    adapter = make_tiny_chat_adapter()
    cfg = ChatConfig(conversations=10, batch_size=4, max_new_tokens=6, weight=0.4, multi_turn_fraction=1.0,
                     heldout_every=5)
    build_chat_source(adapter.hf, adapter.tokenizer, corpus, cfg, progress=False)
    manifest = json.loads((corpus / "manifest.json").read_text())
    weights = {e["name"]: e["weight"] for e in manifest["sources"]}
    assert weights["chat"] == pytest.approx(0.4) and sum(weights.values()) == pytest.approx(1.0)
    rows = [json.loads(line) for part in sorted((corpus / "chat-parts").glob("*.jsonl")) for line in part.open()]
    assert [r["index"] for r in rows] == list(range(10))
    # every conversation whose first reply ended gets the follow-up turn (fraction 1)
    assert all(len(r["messages"]) == 4 or (len(r["messages"]) == 2 and r["truncated"]) for r in rows)
    assert all(m["role"] == role for r in rows for m, role in zip(r["messages"], ["user", "assistant"] * 2))
    train = [json.loads(line) for line in (corpus / "chat.train.jsonl").open()]
    heldout = [json.loads(line) for line in (corpus / "chat.heldout.jsonl").open()]
    assert len(train) == 8 and len(heldout) == 2
    for row, line in zip([r for r in rows if r["index"] % 5 != 4], train):
        assert line["text"] == render_transcript(adapter.tokenizer, row["messages"], row["truncated"])
        assert line["text"].startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")
        assert line["text"].endswith("<|im_end|>\n") != row["truncated"]  # a cut reply has no end of turn
    # resume: a lost part is generated again, identically (seeded per batch)
    before = (corpus / "chat-parts" / "00001.jsonl").read_text()
    (corpus / "chat-parts" / "00001.jsonl").unlink()
    build_chat_source(adapter.hf, adapter.tokenizer, corpus, cfg, progress=False)
    assert (corpus / "chat-parts" / "00001.jsonl").read_text() == before
    # ... but not with other settings: the finished batches would mix two recipes
    other = ChatConfig(conversations=10, batch_size=4, max_new_tokens=7, weight=0.4, multi_turn_fraction=1.0,
                       heldout_every=5)
    with pytest.raises(BadInputError, match="max_new_tokens: 6 -> 7"):
        build_chat_source(adapter.hf, adapter.tokenizer, corpus, other, progress=False)
    with pytest.raises(BadInputError, match="model_dtype"):
        ChatConfig(model_dtype="float16")
    # the token stream draws chat sequences, and can be restricted to them
    only_chat = TokenStream(corpus, adapter.tokenizer, 16, "train", sources=("chat",))
    start = adapter.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert sum(start in only_chat.sequence(i) for i in range(20)) >= 10  # windows of transcripts
    assert only_chat.n_tokens == sum(len(adapter.tokenizer(t["text"], add_special_tokens=False).input_ids) + 1
                                     for t in train)
    with pytest.raises(BadInputError, match="no source"):
        TokenStream(corpus, adapter.tokenizer, 16, "train", sources=("nope",))


def test_chat_source_needs_a_chat_template(built, tmp_path):
    from conftest import make_tiny_adapter

    plain = make_tiny_adapter("qwen2")
    with pytest.raises(BadInputError, match="no chat template"):
        build_chat_source(plain.hf, plain.tokenizer, built, ChatConfig(conversations=2), progress=False)


def test_train_cli_on_a_chat_corpus_reports_corpus_and_chat_separately(built, tmp_path, capsys):
    """`mechscope train` on a corpus with chat transcripts, activations from a bfloat16 forward:
    calibration and held-out figures on the float32 model, also per kind of text."""
    import yaml
    from test_cli import run

    _, jsonl, _ = write_sources(tmp_path / "raw")
    corpus = build_corpus(CorpusConfig(sources=(str(jsonl),), heldout_every=3), out=tmp_path / "c")
    adapter = make_tiny_chat_adapter()
    build_chat_source(adapter.hf, adapter.tokenizer, corpus, ChatConfig(conversations=40, batch_size=20,
                      max_new_tokens=8, heldout_every=4), progress=False)
    adapter.hf.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    code, out, err = run(["train", "--model", str(tmp_path / "model"), "--corpus", str(corpus), "--name", "tiny-chat",
                          "--out", str(tmp_path / "set"), "--checkpoint-dir", str(tmp_path / "ckpt"),
                          "--d-transcoder", "16", "--k", "4", "--n-tokens", "600", "--batch-sequences", "4",
                          "--ctx-len", "16", "--eval-sequences", "8", "--model-dtype", "bfloat16", "--no-progress"],
                         capsys)
    assert code == 0, err
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["training"]["model_dtype"] == "bfloat16"
    by_kind = config["heldout_metrics_by_kind"]
    assert set(by_kind) == {"corpus", "chat"} and len(by_kind["chat"]) == adapter.n_layers
    assert all(0 <= m["fvu"] for m in by_kind["chat"]) and by_kind["chat"] != by_kind["corpus"]
