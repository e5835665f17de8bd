"""Behaviour sweeps: statistics against closed forms, seeded samples, exact readouts, the refusal
classifier on hand-labelled replies of the chat model, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_chat_adapter
from test_cli import run

from mechscope.errors import BadInputError
from mechscope.interventions.sweep import (SweepConfig, confusion, fisher_p_value, is_refusal, make_classifier,
                                           newcombe_interval, run_sweep, wilson_interval)

LABELS = Path(__file__).parent / "data" / "refusal_labels.jsonl"


def _wilson_closed_form(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _fisher_by_hand(a: int, n_a: int, b: int, n_b: int) -> float:
    """Two-sided: the sum of hypergeometric probabilities no larger than the observed table's."""
    total, k = n_a + n_b, a + b

    def prob(x):
        return math.comb(n_a, x) * math.comb(n_b, k - x) / math.comb(total, k)

    observed = prob(a)
    return sum(prob(x) for x in range(max(0, k - n_b), min(k, n_a) + 1) if prob(x) <= observed * (1 + 1e-7))


@pytest.mark.parametrize("k, n", [(0, 20), (8, 20), (17, 20), (20, 20), (35, 100), (80, 100)])
def test_wilson_interval_matches_its_closed_form(k, n):
    assert wilson_interval(k, n) == pytest.approx(_wilson_closed_form(k, n), abs=1e-9)


def test_newcombe_and_fisher_match_references():
    # Newcombe (1998) table II example: 56/70 vs 48/80 -> difference 0.2, 95 % CI 0.0524 to 0.3339
    low, high = newcombe_interval(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    for a, n_a, b, n_b in [(8, 10, 1, 6), (17, 20, 13, 20), (3, 100, 12, 100), (0, 50, 0, 50)]:
        assert fisher_p_value(a, n_a, b, n_b) == pytest.approx(min(1.0, _fisher_by_hand(a, n_a, b, n_b)), rel=1e-6)


def test_classifiers():
    assert is_refusal("I'm sorry, but I can't assist with that.") and is_refusal("I\u2019m sorry, I can\u2019t")
    assert is_refusal("As an AI language model, I cannot help") and not is_refusal("Sure! Here is how to bake bread")
    assert not is_refusal("To make a cake, start by ... " + "x" * 200 + " I'm sorry")  # only the opening counts
    assert make_classifier("regex:^Sure")("Sure, here") and not make_classifier("regex:^Sure")("I'm sorry")
    with pytest.raises(BadInputError, match="unknown classifier 'polite'.*refusal"):
        make_classifier("polite")
    with pytest.raises(BadInputError, match="regular expression"):
        make_classifier("regex:(")


def test_refusal_classifier_on_hand_labelled_replies():
    """Replies of qwen2.5-coder-0.5b-instruct (sampled for its transcoder set's chat data), each
    labelled by hand: refusal or not. The README reports this confusion table."""
    rows = [json.loads(line) for line in LABELS.read_text().splitlines() if line.strip()]
    assert len(rows) == 78 and {r["refusal"] for r in rows} == {True, False}
    table = confusion(is_refusal, [(r["reply"], r["refusal"]) for r in rows])
    # 78 replies, 22 refusals: 20 caught, 2 missed ('I"wont help with that"', "I'm not capable of assisting"),
    # 2 false alarms (an "As an AI ..." / "I'm sorry, but as an AI ..." hedge before an answer)
    assert (table["tp"], table["fp"], table["fn"], table["tn"]) == (20, 2, 2, 54), table


@pytest.fixture(scope="module")
def chat_model():
    return make_tiny_chat_adapter()


def test_sweep_is_seeded_and_its_readouts_exact(chat_model):
    from mechscope.models.chat import build_chat_prompt

    prompts = [build_chat_prompt(chat_model.tokenizer, p).text for p in ("a cat", "a dog")]
    cfg = SweepConfig(samples=12, max_new_tokens=5, batch_size=5, classifier="regex:a", first_token="a",
                      continuation="ab", logit_diff=("a", "b"))
    first = run_sweep(chat_model, prompts, cfg)
    again = run_sweep(chat_model, prompts, cfg)
    other = run_sweep(chat_model, prompts, SweepConfig(**{**cfg.__dict__, "seed": 1}))
    assert [p.samples for p in first.prompts] == [p.samples for p in again.prompts]
    assert [p.samples for p in first.prompts] != [p.samples for p in other.prompts]
    for prompt, result in zip(prompts, first.prompts):
        assert len(result.samples) == 12 and result.count == sum("a" in s for s in result.samples)
        assert result.ci == pytest.approx(_wilson_closed_form(result.count, 12))
        ids = chat_model.tokenize(prompt)
        a, b = chat_model.tokenizer("ab", add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = chat_model.hf(torch.cat([ids, torch.tensor([a, b])])[None]).logits[0].log_softmax(-1)
        n = len(ids)
        assert result.p_first_token == pytest.approx(float(logprobs[n - 1, a].exp()), rel=1e-5)
        assert result.logprob_continuation == pytest.approx(float(logprobs[n - 1, a] + logprobs[n, b]), rel=1e-5)
        assert result.logit_diff == pytest.approx(float(logprobs[n - 1, a] - logprobs[n - 1, b]), rel=1e-4, abs=1e-5)
    (comparison,) = first.comparisons
    assert comparison.difference == pytest.approx(first.prompts[1].rate - first.prompts[0].rate)
    data = first.as_dict()
    assert set(data) == {"prompts", "comparisons", "settings"}
    assert set(data["prompts"][0]) == {"prompt", "n", "count", "rate", "ci", "p_first_token", "logprob_continuation",
                                       "samples", "logit_diff"}
    assert set(data["comparisons"][0]) == {"prompt", "difference", "ci", "p_value"}


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, chat_model):
    root = tmp_path_factory.mktemp("sweep-model")
    chat_model.hf.save_pretrained(root)
    chat_model.tokenizer.save_pretrained(root)
    return root


def test_sweep_cli_json_and_plot(chat_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"a cat"\n{"prompt": "a dog"}\n')
    plot = tmp_path / "rates.png"
    code, out, err = run(["sweep", "--prompts", str(prompts), "--chat", "--model", str(chat_model_dir), "--samples", "6",
                          "--max-new-tokens", "3", "--classifier", "regex:a", "--first-token", "a", "--json",
                          "--plot", str(plot)], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert [p["prompt"] for p in data["prompts"]] == ["a cat", "a dog"] and data["settings"]["samples"] == 6
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "BAD"], "is not JSON"),
    (["a cat", "--samples", "0"], "--samples must be >= 1"),
    (["a cat", "--classifier", "polite"], "unknown classifier"),
    (["a cat", "--first-token", "ab"], "not a single token"),
    (["a cat", "--assistant-prefix", "I"], "needs --chat"),
    ([], "at least one PROMPT"),
])
def test_sweep_bad_input_exits_2(chat_model_dir, tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("a cat\n")
    extra = [str(bad) if e == "BAD" else e for e in extra]
    plot = tmp_path / "rates.png"
    code, _, err = run(["sweep", *extra, "--model", str(chat_model_dir), "--samples" if "--samples" not in extra else "--seed",
                        "2" if "--samples" not in extra else "0", "--plot", str(plot)], capsys)
    assert code == 2 and err.startswith("error:") and message in err, err
    assert not plot.exists()


def test_batched_editing_equals_each_sequence_alone(tiny_adapter, make_tiny_transcoders):
    """The batched path of sampling under interventions equals the plain one, row by row."""
    from mechscope.interventions.intervene import BatchEditor, InterventionConfig, _Editor
    from mechscope.interventions.records import FeatureTarget, Intervention
    from mechscope.replacement.replacement_model import ReplacementModel

    adapter = tiny_adapter("llama")
    rm = ReplacementModel(adapter, make_tiny_transcoders(adapter, skip=True))
    prompt = rm.tokenize("a cat sat")
    trace = rm.trace(prompt)
    layer, pos, feature = (int(v) for v in trace.active[0])
    interventions = [Intervention(FeatureTarget(layer, feature, None), "scale", -3.0)]
    config = InterventionConfig(open_ended=True)
    rows = torch.stack([torch.cat([prompt, torch.tensor(t)]) for t in ([5, 6], [7, 8], [9, 9])])  # (3, pos + 2)
    batched = rm.model.edited_forward(rows, BatchEditor(lambda: _Editor(rm, trace, interventions, config, {}, False), 3))
    for b in range(3):
        alone = rm.model.edited_forward(rows[b : b + 1], _Editor(rm, trace, interventions, config, {}, False))
        torch.testing.assert_close(batched[b], alone[0], atol=1e-5, rtol=1e-5)
    plain = rm.model.edited_forward(rows[:1], lambda layer, x, y: y)
    assert not torch.allclose(plain[0], batched[0], atol=1e-4)  # the intervention did something


def test_sweep_under_interventions_is_seeded_and_scale_one_changes_nothing(chat_model, make_tiny_transcoders):
    from mechscope.interventions.intervene import InterventionConfig
    from mechscope.interventions.records import FeatureTarget, Intervention
    from mechscope.models.chat import build_chat_prompt
    from mechscope.replacement.replacement_model import ReplacementModel

    rm = ReplacementModel(chat_model, make_tiny_transcoders(chat_model, skip=True))
    prompt = build_chat_prompt(chat_model.tokenizer, "a cat").text
    trace = rm.trace(rm.tokenize(prompt))
    layer, _, feature = (int(v) for v in trace.active[0])
    cfg = SweepConfig(samples=6, max_new_tokens=3, batch_size=4, classifier="regex:a", first_token="a")
    config = InterventionConfig()
    one = [Intervention(FeatureTarget(layer, feature, None), "scale", 1.0)]
    strong = [Intervention(FeatureTarget(layer, feature, None), "add", 50.0)]
    base = run_sweep(chat_model, [prompt], cfg)
    same = run_sweep(chat_model, [prompt], cfg, rm=rm, interventions=one, intervention_config=config)
    again = run_sweep(chat_model, [prompt], cfg, rm=rm, interventions=one, intervention_config=config)
    pushed = run_sweep(chat_model, [prompt], cfg, rm=rm, interventions=strong, intervention_config=config)
    assert same.prompts[0].samples == again.prompts[0].samples and len(same.prompts[0].samples) == 6
    assert same.prompts[0].p_first_token == pytest.approx(base.prompts[0].p_first_token, rel=1e-4)
    assert pushed.prompts[0].p_first_token != pytest.approx(base.prompts[0].p_first_token, rel=1e-3)
    assert same.settings["interventions"] and not base.settings["interventions"]
    with pytest.raises(BadInputError, match="--continuation"):
        run_sweep(chat_model, [prompt], SweepConfig(**{**cfg.__dict__, "continuation": "a"}), rm=rm, interventions=one,
                  intervention_config=config)


def test_sweep_cli_with_an_injection(chat_model, chat_model_dir, make_tiny_transcoders, tmp_path, capsys):
    from mechscope.transcoders.io import save_transcoder_set

    save_transcoder_set(make_tiny_transcoders(chat_model, skip=True), tmp_path / "tcs")
    args = ["sweep", "a cat", "--chat", "--model", str(chat_model_dir), "--samples", "4", "--max-new-tokens", "2",
            "--classifier", "regex:a", "--first-token", "a", "--json", "--transcoders", str(tmp_path / "tcs")]
    code, out, err = run([*args, "--inject", "1/3@all=40"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["settings"]["interventions"] and len(data["prompts"][0]["samples"]) == 4
    code, _, err = run([*args, "--zero", "1_3_5"], capsys)
    assert code == 2 and "--graph" in err


def test_sweep_with_a_graph_uses_its_model_and_checks_each_prompt(chat_model, chat_model_dir, make_tiny_transcoders,
                                                                  tmp_path, capsys):
    from mechscope.transcoders.io import save_transcoder_set

    save_transcoder_set(make_tiny_transcoders(chat_model, skip=True), tmp_path / "tcs")
    code, out, err = run(["trace", "a cat", "--chat", "--model", str(chat_model_dir), "--transcoders", str(tmp_path / "tcs"),
                          "--out", str(tmp_path / "g"), "--json", "--max-feature-nodes", "10"], capsys)
    assert code == 0, err
    graph = json.loads(out)["graph_path"]
    node = next(n["node_id"] for n in json.load(open(graph))["nodes"] if n["feature_type"] == "cross layer transcoder")
    args = ["sweep", "--chat", "--graph", graph, "--zero", node, "--samples", "2", "--max-new-tokens", "2",
            "--classifier", "regex:a", "--first-token", "a", "--json", "--transcoders", str(tmp_path / "tcs")]
    code, out, err = run([*args, "a cat"], capsys)  # no --model: the graph's
    assert code == 0 and "warning" not in err, err
    code, out, err = run([*args, "a dog"], capsys)
    assert code == 0 and "warning: this prompt's tokens differ from the graph's" in err
