"""Named logit targets the model hardly predicts get a warning naming the likely intent."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from mechscope.attribution.targets import select_logit_targets, unlikely_target_warnings

VOCAB = ["basketball", " basketball", " football", "I", " I", "x"]


class WordTokenizer:
    """One token per vocabulary entry, anything else two tokens (as a sub-word tokenizer would split it)."""

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[VOCAB.index(text)] if text in VOCAB else [5, 5])

    def decode(self, ids):
        return "".join(VOCAB[i] for i in ids)


def _probs(**p):
    probs = torch.zeros(len(VOCAB))
    for token, value in p.items():
        probs[VOCAB.index(token.replace("_", " "))] = value
    return probs


def test_a_target_without_its_leading_space_names_the_spaced_token():
    probs = _probs(basketball=0.0002, _basketball=0.611, _football=0.2)
    (message,) = unlikely_target_warnings(("basketball",), [0], probs, WordTokenizer())
    assert "'basketball' has p = 0.0002" in message and "--target ' basketball'" in message and "0.611" in message


def test_an_unlikely_target_without_a_better_variant_names_the_top_token():
    probs = _probs(_football=0.9, x=0.001)
    (message,) = unlikely_target_warnings(("x",), [5], probs, WordTokenizer())
    assert "'x' has p = 0.0010" in message and "' football'" in message and "0.900" in message


def test_a_likely_target_gets_no_warning(caplog):
    probs = _probs(_I=0.7, I=0.1)
    assert unlikely_target_warnings((" I",), [4], probs, WordTokenizer()) == []
    logits = torch.log(_probs(basketball=0.0001, _basketball=0.9, _football=0.0999))
    W_U = torch.randn(len(VOCAB), 4)
    with caplog.at_level(logging.WARNING, logger="mechscope.attribution.targets"):
        targets, _ = select_logit_targets(logits, W_U, WordTokenizer(), tokens=("basketball",))
    assert targets[0].token == "basketball" and "did you mean --target ' basketball'" in caplog.text
