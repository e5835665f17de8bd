"""Distributed paths equal the single-process ones: two gloo ranks on CPU (``torch.distributed``)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPTS = ("a cat", "a dog", "the sun sat")
SETTINGS = dict(samples=5, max_new_tokens=3, batch_size=2, classifier="regex:a", first_token="a")


def _sweep_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from conftest import make_tiny_chat_adapter

    from mechscope import distributed
    from mechscope.interventions.sweep import SweepConfig, run_sweep
    from mechscope.models.chat import build_chat_prompt

    distributed.init()
    assert distributed.world_size() == world and distributed.rank() == rank
    model = make_tiny_chat_adapter()
    texts = [build_chat_prompt(model.tokenizer, p).text for p in PROMPTS]
    result = run_sweep(model, texts, SweepConfig(**SETTINGS), labels=list(PROMPTS))
    if distributed.is_main():
        with open(out, "w") as f:
            json.dump(result.as_dict(), f)
    import torch.distributed as dist

    dist.destroy_process_group()


def test_a_sweep_split_over_two_ranks_equals_one_process(tmp_path):
    from conftest import make_tiny_chat_adapter

    from mechscope.distributed import gather_in_order, shard
    from mechscope.interventions.sweep import SweepConfig, run_sweep
    from mechscope.models.chat import build_chat_prompt

    assert shard(3) == [0, 1, 2] and gather_in_order(3, ["a", "b", "c"]) == ["a", "b", "c"]  # one process
    model = make_tiny_chat_adapter()
    texts = [build_chat_prompt(model.tokenizer, p).text for p in PROMPTS]
    single = run_sweep(model, texts, SweepConfig(**SETTINGS), labels=list(PROMPTS)).as_dict()
    out = tmp_path / "two.json"
    torch.multiprocessing.spawn(_sweep_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    assert [p["prompt"] for p in two["prompts"]] == list(PROMPTS)
    assert [p["samples"] for p in two["prompts"]] == [p["samples"] for p in single["prompts"]]
    assert [p["p_first_token"] for p in two["prompts"]] == [p["p_first_token"] for p in single["prompts"]]
    assert two["comparisons"] == json.loads(json.dumps(single["comparisons"]))


# ------------------------------------------------------------------------------ data-parallel training
def _tiny_corpus(root):
    from test_training import write_sources

    from mechscope.data.corpus import CorpusConfig, build_corpus

    txt, jsonl, _ = write_sources(root / "raw")
    return build_corpus(CorpusConfig(sources=(str(txt), str(jsonl)), weights=(4.0, 1.0), heldout_every=3),
                        out=root / "built")


def _assert_same_training_state(a, b) -> None:
    from safetensors.torch import load_file

    one = load_file(str(a / "checkpoint" / "state.safetensors"))
    two = load_file(str(b / "checkpoint" / "state.safetensors"))
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert torch.allclose(value, two[name], rtol=1e-5, atol=1e-6), name


def _world(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mechscope import distributed

    distributed.init()


def _train_worker(rank: int, world: int, port: int, corpus: str, out: str, ckpt: str) -> None:
    _world(rank, world, port)
    from pathlib import Path

    from conftest import make_tiny_adapter
    from test_training import CTX_LEN, make_tiny_tokenizer

    from mechscope.data.corpus import TokenStream
    from mechscope.training.trainer import train_transcoders

    tok = make_tiny_tokenizer()
    train = TokenStream(Path(corpus), tok, CTX_LEN, "train")
    heldout = TokenStream(Path(corpus), tok, CTX_LEN, "heldout")
    train_transcoders(make_tiny_adapter("llama"), train, heldout, _ddp_config(), Path(out), Path(ckpt), progress=False)
    import torch.distributed as dist

    dist.destroy_process_group()


def _ddp_config():
    from test_training import tiny_train_config

    # 4 sequences a batch, 2 optimizer steps on it: each of two ranks takes one sequence a step;
    # resampling every 6 of the 16 steps exercises the gathered-batch path. Short on purpose: TopK and
    # the firing masks are discrete, so over hundreds of steps a 1e-8 difference in summation order
    # (two half-batch forward passes instead of one) eventually flips one choice and the runs part
    return tiny_train_config(n_tokens=480, batch_sequences=4, minibatches=2, resample_every=6, resample_until=0.9,
                             dead_after_tokens=120)


def test_two_ranks_train_the_same_weights_as_one_process(tmp_path, caplog):
    from test_training import CTX_LEN, make_tiny_tokenizer

    from conftest import make_tiny_adapter
    from mechscope.data.corpus import TokenStream
    from mechscope.errors import BadInputError
    from mechscope.training.trainer import gather_rows, rank_rows, train_transcoders
    from mechscope.transcoders.io import load_transcoder_set

    assert rank_rows(4, 2) == [0, 1, 2, 3] and gather_rows(torch.arange(6.0)[:, None], 2).flatten().tolist() == list(range(6))
    corpus = _tiny_corpus(tmp_path)
    tok = make_tiny_tokenizer()
    train, heldout = TokenStream(corpus, tok, CTX_LEN, "train"), TokenStream(corpus, tok, CTX_LEN, "heldout")
    cfg = _ddp_config()
    with caplog.at_level("INFO", logger="mechscope.training.trainer"):
        one, metrics_one = train_transcoders(make_tiny_adapter("llama"), train, heldout, cfg, tmp_path / "one",
                                             tmp_path / "ck-one", progress=False)
    resampled = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert len(resampled) == 2 and "[0, 0]" not in resampled[0]  # features were resampled in these steps
    torch.multiprocessing.spawn(_train_worker, nprocs=2, join=True,
                                args=(2, _free_port(), str(corpus), str(tmp_path / "two"), str(tmp_path / "ck-two")))

    # the float32 training state (weights, Adam moments, firing counters) of rank 0 equals one process's
    _assert_same_training_state(tmp_path / "ck-one", tmp_path / "ck-two")
    assert json.loads((tmp_path / "ck-two" / "checkpoint" / "state.json").read_text())["world_size"] == 2
    two = load_transcoder_set(tmp_path / "two")  # calibrated and saved by rank 0
    for a, b in zip(load_transcoder_set(tmp_path / "one").transcoders, two.transcoders):
        for name, p in a.state_dict().items():
            assert torch.allclose(p.float(), b.state_dict()[name].float(), rtol=1e-2, atol=1e-5), name  # bfloat16 files
    metrics_two = __import__("yaml").safe_load((tmp_path / "two" / "config.yaml").read_text())["heldout_metrics"]
    for m1, m2 in zip(metrics_one, metrics_two):
        assert abs(m1.fvu - m2["fvu"]) < 1e-3 and abs(m1.l0 - m2["l0"]) < 0.2
    # a checkpoint of two ranks does not resume in one process
    import pytest

    with pytest.raises(BadInputError, match="written by 2 process"):
        train_transcoders(make_tiny_adapter("llama"), train, heldout, cfg, tmp_path / "again", tmp_path / "ck-two",
                          progress=False)
    assert not (tmp_path / "again").exists()


# ------------------------------------------------------------------------------ many graphs, split over ranks
def _write_prompts(path, lines) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


JOBS = [{"prompt": "a cat sat"}, {"prompt": "the dog ran", "target": "t", "slug": "dog"},
        {"prompt": "a bird sang", "target": ["a", "b"]}]


def _trace_worker(rank: int, world: int, port: int, args: list, out: str) -> None:
    _world(rank, world, port)
    import contextlib
    import io

    from mechscope.cli.main import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(args)
    if rank == 0:
        with open(out, "w") as f:
            f.write(stdout.getvalue())
    import torch.distributed as dist

    dist.destroy_process_group()


def test_trace_prompts_file_gives_the_same_graphs_on_two_ranks(tmp_path, capsys):
    from test_cli import run

    from conftest import make_tiny_adapter, make_tiny_transcoders
    from mechscope.graph.io import load_graph
    from mechscope.transcoders.io import save_transcoder_set

    adapter = make_tiny_adapter("llama")
    adapter.hf.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    save_transcoder_set(make_tiny_transcoders(adapter, skip=True), tmp_path / "tcs")
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, JOBS)

    def args(out):
        return ["trace", "--prompts", str(prompts), "--model", str(tmp_path / "model"), "--transcoders",
                str(tmp_path / "tcs"), "--out", str(out), "--json", "--max-feature-nodes", "20"]

    code, out, err = run(args(tmp_path / "one"), capsys)
    assert code == 0, err
    single = [json.loads(line) for line in out.splitlines()]
    assert [s["slug"] for s in single] == ["a-cat-sat", "dog", "a-bird-sang"]
    assert [t["token"] for t in single[1]["logit_targets"]] == ["t"]
    assert [t["token"] for t in single[2]["logit_targets"]] == ["a", "b"]
    torch.multiprocessing.spawn(_trace_worker, nprocs=2, join=True,
                                args=(2, _free_port(), args(tmp_path / "two"), str(tmp_path / "two.jsonl")))
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [s["slug"] for s in two] == [s["slug"] for s in single]  # rank 0 prints every summary, in order
    for s in single:
        a, b = load_graph(tmp_path / "one" / s["slug"]), load_graph(tmp_path / "two" / s["slug"])
        assert torch.equal(a.adjacency, b.adjacency) and torch.equal(a.selected_features, b.selected_features)
        assert json.loads((tmp_path / "two" / f"{s['slug']}.json").read_text())["nodes"] == \
            json.loads((tmp_path / "one" / f"{s['slug']}.json").read_text())["nodes"]
    # bad files: one clear error naming the line, exit 2, nothing written
    for lines, message in (([{"prompt": "a"}, "not json"], "line 2 is not JSON"),
                           ([{"prompt": "a", "colour": 1}], "unknown key"),
                           ([{"prompt": ""}], "non-empty string"),
                           ([{"prompt": "a", "target": 3}], "\"target\" must be"),
                           ([{"prompt": "a", "slug": "../x"}], "\"slug\" must be"),
                           ([{"prompt": "a cat"}, {"prompt": "a cat"}], "would both be written"),
                           ([{"prompt": "a cat"}, {"prompt": "a dog", "target": "no"}], "prompt 2: target 'no' is not a single"),
                           ([], "holds no prompts")):
        _write_prompts(prompts, lines)
        code, out, err = run(args(tmp_path / "bad"), capsys)
        assert code == 2 and message in err, err
        assert not (tmp_path / "bad").exists()
    code, out, err = run(["trace", "a cat", "--prompts", str(prompts), "--model", str(tmp_path / "model")], capsys)
    assert code == 2 and "leave out PROMPT" in err


# ------------------------------------------------------------------------------ feature stores, corpus-sharded
def _store_setup(root):
    from test_training import CTX_LEN, write_sources

    from conftest import make_tiny_adapter, make_tiny_transcoders
    from mechscope.data.corpus import CorpusConfig, TokenStream, build_corpus
    from mechscope.replacement.replacement_model import ReplacementModel

    corpus = root / "corpus"
    if not (corpus / "manifest.json").exists():
        txt, jsonl, _ = write_sources(root / "raw")
        build_corpus(CorpusConfig(sources=(str(txt), str(jsonl))), out=corpus)
    adapter = make_tiny_adapter("llama")
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter, skip=True))
    return rm, TokenStream(corpus, adapter.tokenizer, CTX_LEN, seed=5)


def _store_worker(rank: int, world: int, port: int, root: str) -> None:
    _world(rank, world, port)
    from pathlib import Path

    from test_feature_store import BUILD, N_TOKENS

    from mechscope.features.build import build_feature_store

    rm, stream = _store_setup(Path(root))
    build_feature_store(rm, stream, N_TOKENS, Path(root) / "two.sqlite", Path(root) / "ck-two", **BUILD)
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_ranks_build_the_same_feature_store_cell_by_cell(tmp_path):
    import sqlite3

    from test_feature_store import BUILD, N_TOKENS

    from mechscope.features.build import build_feature_store

    rm, stream = _store_setup(tmp_path)
    one = build_feature_store(rm, stream, N_TOKENS, tmp_path / "one.sqlite", tmp_path / "ck-one", **BUILD)
    torch.multiprocessing.spawn(_store_worker, nprocs=2, join=True, args=(2, _free_port(), str(tmp_path)))
    assert sorted(p.name for p in (tmp_path / "ck-two").iterdir()) == ["checkpoint-rank0-of-2", "checkpoint-rank1-of-2"]
    a, b = sqlite3.connect(one), sqlite3.connect(tmp_path / "two.sqlite")
    tables = [r[0] for r in a.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    assert tables == [r[0] for r in b.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    compared = 0
    for table in tables:
        rows_a = sorted(a.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
        rows_b = sorted(b.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
        assert rows_a == rows_b, table  # densities, maxima, histograms, top and quantile examples, logits
        compared += len(rows_a)
    assert compared > 1000


def _clt_worker(rank: int, world: int, port: int, corpus: str, out: str, ckpt: str, shard: bool = False,
                resample: bool = True, method: str = "topk") -> None:
    _world(rank, world, port)
    from pathlib import Path

    from conftest import make_tiny_adapter
    from test_training import CTX_LEN, make_tiny_tokenizer

    from mechscope.data.corpus import TokenStream
    from mechscope.training.clt_trainer import train_clt

    tok = make_tiny_tokenizer()
    train_clt(make_tiny_adapter("llama"), TokenStream(Path(corpus), tok, CTX_LEN, "train"),
              TokenStream(Path(corpus), tok, CTX_LEN, "heldout"), _clt_config(resample, method), Path(out), Path(ckpt),
              progress=False, shard_features=shard)
    import torch.distributed as dist

    dist.destroy_process_group()


def _clt_config(resample: bool = True, method: str = "topk"):
    """With ``resample``, dead features (unseen for 30 tokens) are resampled every 2 steps (TopK)."""
    from test_training import tiny_train_config

    return tiny_train_config(n_tokens=480, d_transcoder=32, k=4, batch_sequences=4, minibatches=2,
                             resample_every=2 if resample else 0, dead_after_tokens=30, resample_until=0.9,
                             method=method, threshold_init=0.05)


def _resample_worker(rank: int, world: int, port: int, out: str) -> None:
    _world(rank, world, port)
    _resample_once(f"{out}.{rank}", slice(rank * 16, (rank + 1) * 16))
    import torch.distributed as dist

    dist.barrier()  # no rank tears the group down while the other's last collective is still in flight
    dist.destroy_process_group()


def _resample_once(out: str, features: slice | None) -> None:
    """One resampling of a CLT (or its feature shard) with 4 dead features per layer; saves the state."""
    from safetensors.torch import save_file

    from conftest import make_tiny_adapter
    from mechscope.training.clt_trainer import CLTTrainee
    from mechscope.training.trainer import _activations

    adapter = make_tiny_adapter("llama")
    ids = adapter.tokenize("a cat sat on the mat and the dog ran far away")[None].repeat(2, 1)
    xs, ys = _activations(adapter, ids.numpy())
    trainee = CLTTrainee(adapter.n_layers, adapter.d_model, _clt_config(), torch.Generator().manual_seed(0), features)
    trainee.initialize(xs, ys)
    whole = torch.zeros(adapter.n_layers, 32, dtype=torch.bool)
    whole[:, [1, 5, 20, 30]] = True  # dead in both halves
    trainee.last_fired[whole[:, features or slice(None)]] = 100
    opt = torch.optim.Adam(trainee.parameters(), lr=1e-3)
    trainee.resample_dead(xs, ys, opt, torch.Generator().manual_seed(3))
    save_file({k: v.contiguous() for k, v in trainee.state_dict().items()}, out)


def test_feature_shards_resample_as_one_process(tmp_path):
    """Each feature shard draws the tokens of every shard's dead features in feature order and keeps its
    own: one resampling in two shards equals one process's (the end-to-end sharded run below compares
    without resampling, since Adam's reset moments turn float noise of the all-reduced reconstruction
    into visible differences a few steps later)."""
    from safetensors.torch import load_file

    _resample_once(str(tmp_path / "one.safetensors"), None)
    torch.multiprocessing.spawn(_resample_worker, nprocs=2, join=True,
                                args=(2, _free_port(), str(tmp_path / "shard.safetensors")))
    one = load_file(str(tmp_path / "one.safetensors"))
    shards = [load_file(str(tmp_path / f"shard.safetensors.{r}")) for r in range(2)]
    for name, value in one.items():
        if name.startswith(("W_dec", "W_enc", "b_enc", "last_fired")):
            whole = torch.cat([s[name] for s in shards], dim=1 if name == "last_fired" else 0)
            torch.testing.assert_close(value, whole, rtol=1e-5, atol=1e-6, msg=name)
    assert (one["last_fired"] == 0).all()  # the dead features were resampled (their counts reset)


@pytest.mark.parametrize("method", ["topk", "jumprelu"])
def test_two_ranks_train_the_same_clt_as_one_process(tmp_path, caplog, method):
    import logging

    from test_training import CTX_LEN, make_tiny_tokenizer

    from conftest import make_tiny_adapter
    from mechscope.data.corpus import TokenStream
    from mechscope.training.clt_trainer import train_clt

    corpus = _tiny_corpus(tmp_path)
    tok = make_tiny_tokenizer()
    with caplog.at_level(logging.INFO, logger="mechscope.training.clt_trainer"):
        train_clt(make_tiny_adapter("llama"), TokenStream(corpus, tok, CTX_LEN, "train"),
                  TokenStream(corpus, tok, CTX_LEN, "heldout"), _clt_config(method=method), tmp_path / "one",
                  tmp_path / "ck-one", progress=False)
    if method == "topk":
        resampled = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
        assert resampled and any(any(c != "0" for c in m.split("[")[1].rstrip("] dead features").split(", "))
                                 for m in resampled), resampled  # features were resampled in this run
    torch.multiprocessing.spawn(_clt_worker, nprocs=2, join=True,
                                args=(2, _free_port(), str(corpus), str(tmp_path / "two"), str(tmp_path / "ck-two"),
                                      False, True, method))
    _assert_same_training_state(tmp_path / "ck-one", tmp_path / "ck-two")
    assert (tmp_path / "two" / "config.yaml").exists()


def test_feature_sharded_clt_training_equals_one_process(tmp_path):
    """Two ranks, each holding half of every layer's features (and reading every batch whole), train
    the one-process CLT: the slices put together equal its training state."""
    import yaml
    from safetensors.torch import load_file
    from test_training import CTX_LEN, make_tiny_tokenizer

    from conftest import make_tiny_adapter
    from mechscope.data.corpus import TokenStream
    from mechscope.training.clt_trainer import train_clt
    from mechscope.transcoders.io import load_transcoder_set

    corpus = _tiny_corpus(tmp_path)
    tok = make_tiny_tokenizer()
    train_clt(make_tiny_adapter("llama"), TokenStream(corpus, tok, CTX_LEN, "train"),
              TokenStream(corpus, tok, CTX_LEN, "heldout"), _clt_config(False), tmp_path / "one", tmp_path / "ck-one",
              progress=False)
    torch.multiprocessing.spawn(_clt_worker, nprocs=2, join=True, args=(2, _free_port(), str(corpus), str(tmp_path / "two"),
                                                                       str(tmp_path / "ck-two"), True, False))
    one = load_file(str(tmp_path / "ck-one" / "checkpoint" / "state.safetensors"))
    shards = [load_file(str(tmp_path / "ck-two" / f"checkpoint-shard{r}-of-2" / "state.safetensors")) for r in range(2)]
    assert shards[0]["model.W_enc.0"].shape[0] == one["model.W_enc.0"].shape[0] // 2  # half the features each
    for name, value in one.items():
        if not name.startswith("model."):
            continue
        if any(f".{p}." in name + "." for p in ("b_dec", "W_skip")) or name.endswith(("in_scale", "out_scale")):
            parts = [shards[0][name]]  # replicated
        else:
            parts = [s[name] for s in shards]
        whole = torch.cat(parts, dim=1 if name.endswith("last_fired") else 0)
        assert torch.allclose(value, whole, rtol=1e-4, atol=1e-5), name
    metrics_one = yaml.safe_load((tmp_path / "one" / "config.yaml").read_text())["heldout_metrics"]
    metrics_two = yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["heldout_metrics"]
    for a, b in zip(metrics_one, metrics_two):
        assert abs(a["fvu"] - b["fvu"]) < 1e-3 and abs(a["l0"] - b["l0"]) < 0.2
    assert load_transcoder_set(tmp_path / "two").d_transcoder(0) == 32  # rank 0 saved the whole set
