"""Corpus building, the token stream, and transcoder training on a tiny model.

Two local sources with disjoint alphabets (lowercase prose in a ``.txt`` file, uppercase/digit
"code" in a ``.jsonl`` file) make the source of every sampled sequence visible, so the sampling
weights can be checked. Training runs on the tiny Llama (d_model 32, 2 layers) for about ten
thousand tokens: enough to show that training lowers held-out FVU, and that an interrupted run
resumes to bit-identical weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_tiny_adapter, make_tiny_tokenizer
from mechscope.data.corpus import CorpusConfig, TokenStream, build_corpus
from mechscope.data.sources import SOURCES
from mechscope.errors import BadInputError
from mechscope.training import trainer
from mechscope.training.metrics import MetricsAccumulator
from mechscope.training.trainer import TrainConfig, train_transcoders
from mechscope.transcoders.activations import JumpReLU
from mechscope.transcoders.io import load_transcoder_set

CTX_LEN = 16
WORDS = "the a cat dog sat on mat and ran far away from home over hill under tree with bird song".split()


# ------------------------------------------------------------------------------------ corpus
def prose(rng: random.Random, n_words: int) -> str:
    """Lowercase letters, spaces and a full stop only."""
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def code(rng: random.Random, n_statements: int) -> str:
    """Uppercase letters, digits and ``=+;`` only: no character in common with :func:`prose` but space."""
    statements = (f"X{rng.randint(0, 99)} = Y{rng.randint(0, 9)} + {rng.randint(0, 999)};" for _ in range(n_statements))
    return " ".join(statements)


def write_sources(root: Path, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """A ~3 KB prose ``.txt`` (one document) and a ``.jsonl`` of 12 ~200-character code documents."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    txt = root / "prose.txt"
    txt.write_text("\n".join(prose(rng, 12) for _ in range(60)))
    docs = [code(rng, 20) for _ in range(12)]
    jsonl = root / "code.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return txt, jsonl, docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A built corpus: prose weight 0.8, code weight 0.2, every 3rd code document held out."""
    root = tmp_path_factory.mktemp("corpus")
    txt, jsonl, _ = write_sources(root / "raw")
    config = CorpusConfig(sources=(str(txt), str(jsonl)), weights=(4.0, 1.0), heldout_every=3)
    return build_corpus(config, out=root / "built")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_manifest_lists_sources_with_normalised_weights(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["heldout_every"] == 3
    entries = {e["name"]: e for e in manifest["sources"]}
    assert list(entries) == ["prose_txt", "code_jsonl"]
    assert entries["prose_txt"]["weight"] == pytest.approx(0.8)
    assert entries["code_jsonl"]["weight"] == pytest.approx(0.2)
    assert sum(e["weight"] for e in manifest["sources"]) == pytest.approx(1.0)
    assert entries["prose_txt"]["documents"] == 1 and entries["prose_txt"]["heldout_documents"] == 0
    assert entries["code_jsonl"]["documents"] == 8 and entries["code_jsonl"]["heldout_documents"] == 4
    assert entries["prose_txt"]["source"].endswith("prose.txt")
    for name in entries:
        assert (corpus / f"{name}.train.jsonl").exists() and (corpus / f"{name}.heldout.jsonl").exists()
    assert entries["code_jsonl"]["characters"] == sum(len(d) for d in read_jsonl(corpus / "code_jsonl.train.jsonl"))


def test_heldout_split_gets_every_nth_document(tmp_path):
    _, jsonl, docs = write_sources(tmp_path / "raw")
    out = build_corpus(CorpusConfig(sources=(str(jsonl),), heldout_every=4), out=tmp_path / "built")
    assert read_jsonl(out / "code_jsonl.heldout.jsonl") == [docs[3], docs[7], docs[11]]
    assert read_jsonl(out / "code_jsonl.train.jsonl") == [d for i, d in enumerate(docs) if i % 4 != 3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][0]["weight"] == 1.0  # default weights are equal


def test_equal_weights_by_default(tmp_path):
    txt, jsonl, _ = write_sources(tmp_path / "raw")
    out = build_corpus(CorpusConfig(sources=(str(txt), str(jsonl))), out=tmp_path / "built")
    weights = [e["weight"] for e in json.loads((out / "manifest.json").read_text())["sources"]]
    assert weights == [0.5, 0.5]


def test_unknown_source_lists_registry_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so the name cannot be a relative path that happens to exist
    with pytest.raises(BadInputError) as info:
        build_corpus(CorpusConfig(sources=("no-such-source",)), out=tmp_path / "built")
    message = str(info.value)
    assert "no-such-source" in message
    for name in SOURCES:
        assert name in message
    assert not (tmp_path / "built" / "manifest.json").exists()


@pytest.mark.parametrize("content", ["", "  \n\n \t\n"])
def test_source_without_text_is_rejected(tmp_path, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    with pytest.raises(BadInputError, match="empty.txt"):
        build_corpus(CorpusConfig(sources=(str(empty),)), out=tmp_path / "built")
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": content}) + "\n")
    with pytest.raises(BadInputError, match="blank.jsonl"):
        build_corpus(CorpusConfig(sources=(str(blank),)), out=tmp_path / "built")


def test_corpus_config_validation():
    with pytest.raises(BadInputError, match="2 weights for 1 sources"):
        CorpusConfig(sources=("a.txt",), weights=(1.0, 2.0))
    with pytest.raises(BadInputError, match="positive"):
        CorpusConfig(sources=("a.txt", "b.txt"), weights=(1.0, 0.0))
    with pytest.raises(BadInputError, match="heldout_every"):
        CorpusConfig(sources=("a.txt",), heldout_every=1)
    with pytest.raises(BadInputError, match="at least one source"):
        CorpusConfig(sources=())


def test_rebuilt_corpus_is_not_served_from_a_stale_token_cache(tmp_path, tokenizer):
    out = tmp_path / "built"
    first = tmp_path / "first.txt"
    first.write_text("the cat sat on the mat. " * 40)
    build_corpus(CorpusConfig(sources=(str(first),)), out=out)
    assert set(TokenStream(out, tokenizer, CTX_LEN).sequence(0)[1:]) <= set(tokenizer("the cat sat on mat.").input_ids)
    first.write_text("X1 = Y2 + 345; " * 60)  # same source name, new text
    build_corpus(CorpusConfig(sources=(str(first),)), out=out)
    sequence = TokenStream(out, tokenizer, CTX_LEN).sequence(0)
    assert set(sequence[1:]) <= set(tokenizer("X1 = Y2 + 345;", add_special_tokens=False).input_ids) | {
        tokenizer.eos_token_id
    }


# ------------------------------------------------------------------------------------ token stream
def source_of(sequence: np.ndarray, tokenizer) -> str:
    text = tokenizer.decode(sequence[1:].tolist(), skip_special_tokens=True)
    has_lower, has_upper = any(c.islower() for c in text), any(c.isupper() or c.isdigit() for c in text)
    assert has_lower != has_upper, f"a window mixes sources: {text!r}"
    return "prose" if has_lower else "code"


def test_sequences_have_ctx_len_and_start_with_bos(corpus, tokenizer):
    stream = TokenStream(corpus, tokenizer, CTX_LEN)
    for i in range(20):
        sequence = stream.sequence(i)
        assert sequence.shape == (CTX_LEN,) and sequence.dtype == np.int64
        assert sequence[0] == tokenizer.bos_token_id
        assert tokenizer.bos_token_id not in sequence[1:]
    heldout = TokenStream(corpus, tokenizer, CTX_LEN, split="heldout")
    assert heldout.n_tokens < stream.n_tokens
    assert all(source_of(heldout.sequence(i), tokenizer) == "code" for i in range(10))  # prose has no held-out doc


def test_sequence_is_a_function_of_seed_and_index(corpus, tokenizer):
    a = TokenStream(corpus, tokenizer, CTX_LEN, seed=7)
    b = TokenStream(corpus, tokenizer, CTX_LEN, seed=7)  # second instance, reads the token cache
    other = TokenStream(corpus, tokenizer, CTX_LEN, seed=8)
    for i in range(30):
        assert np.array_equal(a.sequence(i), b.sequence(i))
    assert any(not np.array_equal(a.sequence(i), other.sequence(i)) for i in range(30))
    assert any(not np.array_equal(a.sequence(i), a.sequence(i + 1)) for i in range(30))


def test_batches_resume_exactly(corpus, tokenizer):
    stream = TokenStream(corpus, tokenizer, CTX_LEN, seed=3)
    from_zero = stream.batches(4)
    run = [next(from_zero) for _ in range(5)]
    assert [index for index, _ in run] == [4, 8, 12, 16, 20]
    assert all(batch.shape == (4, CTX_LEN) for _, batch in run)
    resumed = TokenStream(corpus, tokenizer, CTX_LEN, seed=3).batches(4, start=8)
    for expected_index, expected_batch in run[2:]:
        index, batch = next(resumed)
        assert index == expected_index
        assert np.array_equal(batch, expected_batch)


def test_sources_are_drawn_in_proportion_to_their_weights(corpus, tokenizer):
    stream = TokenStream(corpus, tokenizer, CTX_LEN, seed=0)
    n = 1500
    share = sum(source_of(stream.sequence(i), tokenizer) == "prose" for i in range(n)) / n
    assert share == pytest.approx(0.8, abs=0.04)  # binomial sd ~0.01


def test_document_mix_packs_pieces_of_documents_from_both_sources(corpus, tokenizer):
    stream = TokenStream(corpus, tokenizer, CTX_LEN, seed=0, mix="document", min_piece=2)
    again = TokenStream(corpus, tokenizer, CTX_LEN, seed=0, mix="document", min_piece=2)
    eos, mixed = tokenizer.eos_token_id, 0
    for i in range(200):
        sequence = stream.sequence(i)
        assert sequence.shape == (CTX_LEN,) and sequence[0] == tokenizer.bos_token_id
        assert np.array_equal(sequence, again.sequence(i))
        kinds = set()
        for piece in np.split(sequence[1:], np.flatnonzero(sequence[1:] == eos) + 1):
            text = tokenizer.decode(piece.tolist(), skip_special_tokens=True)
            prose, code = any(c.islower() for c in text), any(c.isupper() or c.isdigit() for c in text)
            assert not (prose and code), f"a piece mixes sources: {text!r}"
            kinds |= {"prose"} if prose else {"code"} if code else set()
        mixed += len(kinds) == 2
    assert 40 < mixed < 200  # prose (weight 0.8) and code pieces share contexts


def test_token_stream_rejects_bad_arguments(corpus, tokenizer, tmp_path):
    with pytest.raises(BadInputError, match="manifest"):
        TokenStream(tmp_path, tokenizer)
    with pytest.raises(BadInputError, match="split"):
        TokenStream(corpus, tokenizer, CTX_LEN, split="test")
    with pytest.raises(BadInputError, match="ctx_len"):
        TokenStream(corpus, tokenizer, 1)
    with pytest.raises(BadInputError, match="'shuffled'.*source, document|source, document.*'shuffled'"):
        TokenStream(corpus, tokenizer, CTX_LEN, mix="shuffled")
    with pytest.raises(BadInputError, match="no train text"):
        TokenStream(corpus, tokenizer, 100_000)


# ------------------------------------------------------------------------------------ training
def tiny_train_config(**overrides) -> TrainConfig:
    fields = dict(
        d_transcoder=64,
        k=6,
        skip_connection=True,
        n_tokens=12_000,  # 200 batches of 4 x 15 tokens, 400 optimizer steps
        batch_sequences=4,
        ctx_len=CTX_LEN,
        lr=5e-3,
        warmup_steps=5,
        aux_k=16,
        dead_after_tokens=600,
        eval_sequences=16,
        calibration_sequences=16,
        checkpoint_every_s=1e9,
        minibatches=2,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def llama():
    """A private tiny Llama (training must not share the session adapters)."""
    return make_tiny_adapter("llama")


@pytest.fixture(scope="module")
def streams(corpus, tokenizer) -> tuple[TokenStream, TokenStream]:
    return TokenStream(corpus, tokenizer, CTX_LEN, "train"), TokenStream(corpus, tokenizer, CTX_LEN, "heldout")


def run(adapter, streams: tuple[TokenStream, TokenStream], cfg: TrainConfig, out: Path, checkpoint_dir: Path):
    """``train_transcoders`` without a progress bar."""
    train, heldout = streams
    return train_transcoders(adapter, train, heldout, cfg, out, checkpoint_dir, progress=False)


def heldout_fvu(adapter, transcoders, heldout: TokenStream, cfg: TrainConfig) -> list[float]:
    """FVU of ``transcoders`` on the same held-out batches the trainer evaluates on."""
    accs = [MetricsAccumulator(layer, cfg.d_transcoder) for layer in range(adapter.n_layers)]
    for i, (_, batch) in enumerate(heldout.batches(cfg.batch_sequences)):
        if i * cfg.batch_sequences >= cfg.eval_sequences:
            break
        ins, outs = adapter.run_with_mlp_sites(torch.as_tensor(batch))
        for layer, tc in enumerate(transcoders.transcoders):
            x, y = ins[layer][:, 1:].reshape(-1, adapter.d_model), outs[layer][:, 1:].reshape(-1, adapter.d_model)
            acts = tc.encode(x)
            accs[layer].update(y, tc.decode(acts, x), acts)
    return [a.result().fvu for a in accs]


def test_training_lowers_heldout_fvu(llama, streams, tmp_path, monkeypatch):
    cfg = tiny_train_config()
    # untrained: the same run with every optimizer step skipped (initialisation + calibration only)
    monkeypatch.setattr(trainer, "_optimizer_step", lambda *args, **kwargs: None)
    _, untrained = run(llama, streams, cfg, tmp_path / "untrained", tmp_path / "ck0")
    monkeypatch.undo()
    transcoders, metrics = run(llama, streams, cfg, tmp_path / "set", tmp_path / "ck1")

    assert len(metrics) == llama.n_layers == transcoders.n_layers
    for before, after in zip(untrained, metrics):
        assert after.fvu < 0.6 and after.fvu < 0.6 * before.fvu, (before, after)
        assert 0 < after.l0 < cfg.d_transcoder and after.l0 < 3 * cfg.k
        assert 0 <= after.dead_fraction < 1
        assert after.n_tokens == cfg.eval_sequences * (CTX_LEN - 1)

    loaded = load_transcoder_set(tmp_path / "set")
    assert loaded.n_layers == llama.n_layers and loaded.d_model == llama.d_model
    assert loaded.model_name == llama.name
    for tc in loaded.transcoders:
        assert isinstance(tc.activation_function, JumpReLU)
        assert (tc.activation_function.threshold >= 0).all()
        assert tc.W_skip is not None and tc.d_transcoder == cfg.d_transcoder
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["training"]["tokens_trained"] == cfg.n_tokens
    assert config["training"]["k"] == cfg.k
    assert config["training"]["corpus"] == [{"source": e["source"], "weight": e["weight"]}
                                            for e in streams[0].manifest["sources"]]
    assert [m["fvu"] for m in config["heldout_metrics"]] == pytest.approx([m.fvu for m in metrics])
    # the metrics describe the saved (bfloat16) weights, up to rounding
    assert heldout_fvu(llama, loaded, streams[1], cfg) == pytest.approx([m.fvu for m in metrics], abs=0.05)


def stop_after_first_checkpoint(monkeypatch, module=trainer) -> list[int]:
    """Make the next training run of ``module`` (``trainer`` or ``clt_trainer``) stop
    (KeyboardInterrupt) right after its first checkpoint."""
    original = trainer._save_checkpoint
    saved_steps: list[int] = []

    def save_then_interrupt(path, trainees, opt, state, **options):
        original(path, trainees, opt, state, **options)
        saved_steps.append(state["step"])
        if len(saved_steps) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "_save_checkpoint", save_then_interrupt)
    return saved_steps


@pytest.mark.parametrize("resample_every", [0, 4], ids=["plain", "resampling"])
def test_interrupted_training_resumes_exactly(llama, streams, tmp_path, monkeypatch, resample_every):
    # 40 batches, a checkpoint after each; with resampling, dead features are re-initialised every 2 batches
    cfg = tiny_train_config(n_tokens=2400, checkpoint_every_s=0.0, resample_every=resample_every,
                            dead_after_tokens=60, resample_until=0.9)
    if resample_every:
        calls = []
        original = trainer.TopKTrainee.resample_dead
        monkeypatch.setattr(trainer.TopKTrainee, "resample_dead",
                            lambda self, *a: calls.append(original(self, *a)) or calls[-1])
        run(llama, streams, cfg, tmp_path / "probe", tmp_path / "ck_probe")
        assert sum(calls) > 0  # resampling really happened in this configuration
        monkeypatch.undo()
    uninterrupted, metrics = run(llama, streams, cfg, tmp_path / "a", tmp_path / "ck_a")

    saved_steps = stop_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(llama, streams, cfg, tmp_path / "b", tmp_path / "ck_b")
    assert saved_steps == [cfg.minibatches]  # stopped after the first batch
    assert not (tmp_path / "b").exists()
    state = json.loads((tmp_path / "ck_b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == cfg.minibatches and state["index"] == cfg.batch_sequences

    monkeypatch.undo()
    resumed, resumed_metrics = run(llama, streams, cfg, tmp_path / "b", tmp_path / "ck_b")
    for a, b in zip(uninterrupted.transcoders, resumed.transcoders):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(y, x), name
    assert [m.fvu for m in resumed_metrics] == pytest.approx([m.fvu for m in metrics], abs=1e-6)
    config = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert config["training"]["tokens_trained"] == cfg.n_tokens
    assert sorted(p.name for p in (tmp_path / "ck_b").iterdir()) == ["checkpoint"]  # no temp dirs left


def test_resampling_reinitialises_dead_features():
    cfg = tiny_train_config(dead_after_tokens=10)
    gen = torch.Generator().manual_seed(0)
    tr = trainer.TopKTrainee(8, cfg, gen)
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    tr.initialize(x, y)
    opt = torch.optim.Adam(tr.parameters(), lr=1e-3)
    loss, _, fired = tr.loss(x, y)
    loss.backward()
    opt.step()
    tr.last_fired[:5] = 100  # features 0-4 are dead
    before = tr.W_dec[5:].clone()
    assert tr.resample_dead(x, y, opt, gen) == 5
    assert torch.equal(tr.W_dec[5:], before)  # live features untouched
    assert torch.allclose(tr.W_dec[:5].norm(dim=1), torch.ones(5))
    assert (tr.b_enc[:5] == 0).all() and (tr.last_fired == 0).all()
    assert (opt.state[tr.W_enc]["exp_avg"][:5] == 0).all() and (opt.state[tr.W_enc]["exp_avg"][5:] != 0).any()


def test_checkpoint_from_another_config_is_rejected(llama, streams, tmp_path, monkeypatch):
    cfg = tiny_train_config(n_tokens=600, checkpoint_every_s=0.0)
    stop_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(llama, streams, cfg, tmp_path / "out", tmp_path / "ck")
    monkeypatch.undo()
    before = (tmp_path / "ck" / "checkpoint" / "state.safetensors").read_bytes()
    other = tiny_train_config(n_tokens=600, checkpoint_every_s=0.0, lr=1e-3)
    with pytest.raises(BadInputError, match="different config"):
        run(llama, streams, other, tmp_path / "out", tmp_path / "ck")
    assert (tmp_path / "ck" / "checkpoint" / "state.safetensors").read_bytes() == before  # left untouched
    assert not (tmp_path / "out").exists()
    # schedule fields may change on resume: a longer run continues from the checkpoint
    longer = tiny_train_config(n_tokens=1200, checkpoint_every_s=0.0, resample_until=0.5)
    _, metrics = run(llama, streams, longer, tmp_path / "out", tmp_path / "ck")
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["training"]["tokens_trained"] == 1200 and config["training"]["resample_until"] == 0.5


def test_training_without_warmup_runs(llama, streams, tmp_path):
    cfg = tiny_train_config(n_tokens=120, warmup_steps=0, eval_sequences=4)
    transcoders, metrics = run(llama, streams, cfg, tmp_path / "set", tmp_path / "ck")
    assert transcoders.n_layers == llama.n_layers and all(np.isfinite(m.fvu) for m in metrics)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(k=65, d_transcoder=64), "k=65 exceeds d_transcoder=64"),
        (dict(n_tokens=0), "n_tokens"),
        (dict(skip_init="svd"), "skip_init"),
        (dict(d_transcoder=0, k=0), "d_transcoder"),
        (dict(ctx_len=1), "ctx_len"),
        (dict(lr=0.0), "lr"),
        (dict(minibatches=0), "minibatches"),
        (dict(warmup_steps=-1), "warmup_steps"),
    ],
)
def test_train_config_validation(overrides, message):
    with pytest.raises(BadInputError, match=message):
        tiny_train_config(**overrides)


def test_calibrated_thresholds_match_topk_rates_and_keep_rare_live_features():
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(1000, 4, generator=gen)
    fire_counts = torch.tensor([100.0, 10.0, 0.0, 0.0])
    alive = torch.tensor([True, True, True, False])
    threshold = trainer.calibrated_thresholds(pre, fire_counts, alive)
    fired = (pre > threshold).float().sum(0)
    assert fired[0] == pytest.approx(100, abs=1) and fired[1] == pytest.approx(10, abs=1)
    # never fired in calibration but alive in training: rarer than 1/n, so the sample maximum
    assert threshold[2] == pre[:, 2].max() and fired[2] == 0
    # dead in training too: above every value seen
    assert threshold[3] > pre[:, 3].max()
    assert (threshold >= 0).all()


def test_evaluation_reads_exactly_the_sequences_asked_for(llama, streams):  # noqa: F811
    """3 held-out sequences with batches of 4 are 3 sequences, not a whole batch: the same figures as
    one batch of 3."""
    from conftest import make_tiny_transcoders

    from mechscope.training.trainer import evaluate_transcoders

    transcoders = make_tiny_transcoders(llama)
    three = evaluate_transcoders(llama, transcoders, streams[1], 3, batch_sequences=4)
    one_batch = evaluate_transcoders(llama, transcoders, streams[1], 3, batch_sequences=3)
    assert three[0].n_tokens == 3 * (CTX_LEN - 1)
    assert [m.as_dict() for m in three] == [m.as_dict() for m in one_batch]
