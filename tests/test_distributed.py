"""Distributed paths equal the single-process ones: two gloo ranks on CPU (``torch.distributed``)."""

from __future__ import annotations

import json
import os
import socket

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
