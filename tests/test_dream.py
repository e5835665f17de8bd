"""Fluent dreaming (EPO) on tiny models, with per-layer sets and cross-layer transcoders: it raises
the feature's activation over its start, its frontier is Pareto optimal and sorted, a seed
reproduces it, its token scores are the first-order change of the objective through the embedding
module's real (scaled) vectors, and bad input is a clear error (exit code 2 on the command line)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SET_KINDS, make_tiny_adapter, make_tiny_set, make_tiny_transcoders
from test_cli import SET_DIRS, run, tiny_dirs  # noqa: F401  (module fixture)

from mechscope.errors import BadInputError
from mechscope.features.dream import DreamConfig, _forward, _token_scores, dream_feature, embedding_scale
from mechscope.features.store import write_store
from mechscope.replacement.replacement_model import ReplacementModel

LAYER, FEATURE = 1, 3  # fires on some random prompts of every tiny model, not on most


@pytest.fixture(scope="module", params=[(family, kind) for kind in SET_KINDS for family in ("llama", "gemma3")],
                ids="-".join)
def rm(request):
    family, kind = request.param
    adapter = make_tiny_adapter(family)
    return ReplacementModel(adapter, make_tiny_set(adapter, kind, skip=True))


def brute_force(rm, layer, feature, ids) -> tuple[float, float]:
    """(activation at the last token, mean next-token cross-entropy) of one prompt, recomputed."""
    ids = torch.tensor(ids)[None]
    inputs, _ = rm.model.run_with_mlp_sites(ids, layers=[layer])
    activation = float(rm.transcoders.encode(layer, inputs[0][0, -1].float())[feature])
    logits = rm.model.hf(ids).logits[0, :-1].float()
    return activation, float(F.cross_entropy(logits, ids[0, 1:]))


def test_dreaming_raises_the_activation_over_its_start(rm):
    result = dream_feature(rm, LAYER, FEATURE, n_iters=30, seq_len=8, seed=0)
    best = result.frontier[0]
    assert best.activation > result.start_activation + 1.0
    assert len(result.starts) == 8 and len({p.token_ids for p in result.starts}) == 8  # EPO: random starts
    for prompt in [best, result.frontier[-1], *result.starts[:2]]:
        activation, xent = brute_force(rm, LAYER, FEATURE, prompt.token_ids)
        assert prompt.activation == pytest.approx(activation, rel=1e-4, abs=1e-5)
        assert prompt.xent == pytest.approx(xent, rel=1e-4)
    assert len(result.history) == 30 and result.history == sorted(result.history)
    assert result.history[-1] == pytest.approx(best.activation)
    bos = rm.model.tokenizer.bos_token_id
    assert all(len(p.token_ids) == 8 and p.token_ids[0] == bos for p in result.frontier)
    special = set(rm.model.tokenizer.all_special_ids)
    assert not any(t in special for p in result.frontier for t in p.token_ids[1:])


def test_frontier_is_pareto_optimal_sorted_and_reproducible(rm):
    kwargs = dict(n_iters=12, seq_len=6, restart_every=5)
    result = dream_feature(rm, 0, 5, seed=1, **kwargs)
    points = [(p.activation, p.xent) for p in result.frontier]
    assert len(points) > 1
    for i, (a, x) in enumerate(points):  # no point has >= activation and <= xent, one strictly
        assert not any(b >= a and y <= x and (b > a or y < x) for j, (b, y) in enumerate(points) if j != i)
    assert all(points[i][0] > points[i + 1][0] and points[i][1] > points[i + 1][1] for i in range(len(points) - 1))
    again = dream_feature(rm, 0, 5, seed=1, **kwargs)
    assert [p.as_dict() for p in again.frontier] == [p.as_dict() for p in result.frontier]
    assert again.history == result.history
    other = dream_feature(rm, 0, 5, seed=2, **kwargs)
    assert [p.token_ids for p in other.frontier] != [p.token_ids for p in result.frontier]


def test_start_prompt_text_or_ids():
    adapter = make_tiny_adapter("llama")
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter))
    result = dream_feature(rm, LAYER, FEATURE, n_iters=3, start="a cat sat")
    ids = rm.tokenize("a cat sat")
    assert all(p.token_ids == tuple(ids.tolist()) for p in result.starts)
    assert all(len(p.token_ids) == len(ids) for p in result.frontier)  # the start sets the length
    from_ids = dream_feature(rm, LAYER, FEATURE, n_iters=3, start=ids)
    assert [p.as_dict() for p in from_ids.frontier] == [p.as_dict() for p in result.frontier]


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_token_scores_are_the_objectives_directional_derivative(family):
    """score[pos, v] - score[pos, old] = d/dt objective(e_old + t (e_v - e_old)) at t = 0, with e_v
    the embedding module's output for token v (Gemma's module multiplies by sqrt(d_model))."""
    adapter = make_tiny_adapter(family)
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter))
    embed = adapter.hf.get_input_embeddings()
    members = rm.tokenize("a cat sat")[None]
    lam = torch.tensor([0.7])
    scores = _token_scores(rm, LAYER, FEATURE, members, lam, embedding_scale(rm))[0]  # (pos, vocab)

    def objective(embeds):
        scored = _forward(rm, LAYER, FEATURE, members, embeds)
        return float(scored.pre[0] - lam[0] * scored.xent[0])

    with torch.no_grad():
        base = embed(members)
        for pos, token in [(2, 40), (5, 70), (members.shape[1] - 1, 55)]:
            step = torch.zeros_like(base)
            step[0, pos] = embed(torch.tensor([token]))[0] - base[0, pos]
            h = 1e-2
            slope = (objective(base + h * step) - objective(base - h * step)) / (2 * h)
            linear = float(scores[pos, token] - scores[pos, members[0, pos]])
            assert linear == pytest.approx(slope, rel=2e-2, abs=2e-3), (pos, token)
    assert embedding_scale(rm) == pytest.approx(adapter.d_model ** 0.5 if family == "gemma3" else 1.0, rel=1e-5)


def test_bad_arguments_are_clear_errors(rm):
    with pytest.raises(BadInputError, match=f"layer 9 is out of range 0..{rm.model.n_layers - 1}"):
        dream_feature(rm, 9, 0)
    with pytest.raises(BadInputError, match=r"feature 100000 is out of range 0\.\.47"):
        dream_feature(rm, 0, 100_000)
    with pytest.raises(BadInputError, match="n_iters must be >= 1, got 0"):
        dream_feature(rm, 0, 0, n_iters=0)
    with pytest.raises(BadInputError, match="seq_len must be >= 2, got 1"):
        dream_feature(rm, 0, 0, seq_len=1)
    for penalties in ([-1.0], [], [float("nan")]):
        with pytest.raises(BadInputError, match="penalties must be"):
            dream_feature(rm, 0, 0, penalties=penalties)
    with pytest.raises(BadInputError, match="empty"):
        dream_feature(rm, 0, 0, start="  ")
    assert DreamConfig(penalties=[1, 2]).penalties == (1.0, 2.0)


def _store_with_max(path, layer, feature, max_value):
    """A feature store holding one feature, with the given dashboard maximum."""
    features = {"layer": np.array([layer]), "feature": np.array([feature]), "active": np.array([1]),
                "density": np.array([0.1]), "max_value": np.array([max_value]), "hist": np.zeros((1, 4), int)}
    examples = {c: np.array([], int) for c in ("layer", "feature", "interval", "rank", "sequence", "start",
                                               "position", "value")} | {"kind": np.array([], str),
                                                                         "acts": np.zeros((0, 8))}
    return write_store(path, {"hist_edges": [0, 1, 2, 3, 4], "n_intervals": 0}, features, examples, {},
                       {"pos": [[]], "neg": [[]]})


@pytest.mark.parametrize("set_kind", SET_KINDS)
def test_dream_cli(tiny_dirs, tmp_path, capsys, monkeypatch, set_kind):  # noqa: F811
    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))  # no default store
    tiny = ["--model", str(tiny_dirs / "model"), "--transcoders", str(tiny_dirs / SET_DIRS[set_kind])]
    code, out, err = run(["dream", "1/3", "--iters", "3", "--length", "6", *tiny, "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["feature"] == "1/3" and data["dashboard_max"] is None and len(data["history"]) == 3
    assert data["history"][-1] == data["frontier"][0]["activation"] >= data["start_activation"]
    row = data["frontier"][0]
    assert {"text", "tokens", "activation", "percent_of_max", "xent", "exceeds_dashboard_max"} <= set(row)
    assert row["percent_of_max"] is None and row["exceeds_dashboard_max"] is False and len(row["tokens"]) == 6
    adapter = make_tiny_adapter("llama")  # what tiny_dirs saved: the reported prompt's activation, recomputed
    rm = ReplacementModel(adapter, make_tiny_set(adapter, set_kind, skip=True))
    assert brute_force(rm, 1, 3, row["token_ids"]) == pytest.approx((row["activation"], row["xent"]), rel=1e-4)

    code, out, err = run(["dream", "1/3", "--iters", "3", *tiny], capsys)
    assert code == 0, err
    assert "% of the dashboard max is unavailable: no feature store" in out and "Pareto frontier" in out

    store = _store_with_max(tmp_path / "store.sqlite", 1, 3, 0.5)
    code, out, err = run(["dream", "1/3", "--iters", "20", *tiny, "--store", str(store), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["dashboard_max"] == 0.5
    for row in data["frontier"]:
        assert row["percent_of_max"] == pytest.approx(100 * row["activation"] / 0.5)
        assert row["exceeds_dashboard_max"] == (row["activation"] > 0.5)
    assert data["frontier"][0]["exceeds_dashboard_max"]
    code, out, err = run(["dream", "1/3", "--iters", "20", *tiny, "--store", str(store)], capsys)
    assert code == 0, err
    assert "> max" in out and "exceed the dashboard maximum" in out


@pytest.mark.parametrize("argv, message", [
    (["dream", "1-3"], "feature '1-3' is not a feature id; write LAYER/FEATURE"),
    (["dream", "1/999"], "feature 999 is out of range 0..47"),
    (["dream", "7/3"], "layer 7 is out of range 0..1"),
    (["dream", "1/3", "--iters", "0"], "n_iters must be >= 1"),
    (["dream", "1/3", "--store", "STORE"], "no feature store at"),
])
def test_dream_cli_bad_input_exits_2(tiny_dirs, tmp_path, capsys, monkeypatch, argv, message):  # noqa: F811
    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))
    argv = [str(tmp_path / "missing.sqlite") if a == "STORE" else a for a in argv]
    code, out, err = run([*argv, "--model", str(tiny_dirs / "model"), "--transcoders", str(tiny_dirs / "tcs")], capsys)
    assert code == 2 and message in err, (argv, err)
    assert out == ""
