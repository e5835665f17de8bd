"""Shared fixtures: tiny random host models of every supported family and tiny transcoders.

Everything is built from configs in memory (no downloads, no network): a character-level tokenizer,
a 2-3 layer float32 causal LM per family with randomised norm weights and biases (Hugging Face
initialises RMSNorm weights to 1 or 0 and biases to 0, which would hide bugs in the norm and bias
handling), and per-layer transcoders with JumpReLU / ReLU / TopK features that actually fire, or a
cross-layer transcoder (CLT) of JumpReLU features.

Use them as::

    def test_something(tiny_adapter, make_tiny_transcoders):
        adapter = tiny_adapter("gemma3")
        transcoders = make_tiny_transcoders(adapter, d_transcoder=64, skip=True)

A science test that must hold for either kind of set takes a ``set_kind`` (one of
:data:`SET_KINDS`) and builds its set with ``make_tiny_set(adapter, set_kind)``.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import pytest
import torch

from mechscope.models.adapter import ModelAdapter
from mechscope.models.loading import adapter_class_for
from mechscope.transcoders.activations import make_activation
from mechscope.transcoders.transcoder import (
    CrossLayerTranscoderSet,
    PerLayerTranscoder,
    PerLayerTranscoderSet,
    TranscoderSet,
)

#: every family the adapters cover, in the order tests are parametrised
FAMILIES = ("gemma3", "gemma2", "llama", "qwen2", "qwen3", "gpt2")

#: the kinds of transcoder set (``TranscoderSet.kind``) the science tests run on
SET_KINDS = ("per-layer", "cross-layer")

#: a prompt of 9 characters: 10 tokens with BOS, longer than the Gemma 3 sliding window of 4
TINY_PROMPT = "a cat sat"

SLIDING_WINDOW = 4
VOCAB_SIZE = 128  # >= the tokenizer's 104 tokens; the rest are never produced
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0, 1, 2, 3 as in Gemma


# ------------------------------------------------------------------------------------ tokenizer
def make_tiny_tokenizer(add_bos: bool = True):
    """A character-level ``PreTrainedTokenizerFast``: one token per printable ASCII character.

    Args:
        add_bos: whether the tokenizer itself prepends ``<bos>`` (Gemma, Llama do; GPT-2 does not,
            so the adapter has to).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


# ------------------------------------------------------------------------------------ models
def tiny_config(family: str):
    """A tiny Hugging Face config of ``family`` (one of :data:`FAMILIES`)."""
    import transformers

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        head_dim=8,
        max_position_embeddings=64,
        initializer_range=0.2,  # large enough that attention is far from uniform
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **common,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=SLIDING_WINDOW,
            query_pre_attn_scalar=8,
        )
    if family == "gemma2":
        return transformers.Gemma2Config(
            **common,
            num_hidden_layers=2,
            attn_logit_softcapping=1.5,  # small, so soft-capping changes the scores
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=8,
        )
    if family == "llama":
        return transformers.LlamaConfig(**common, num_hidden_layers=2)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, num_hidden_layers=2)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, num_hidden_layers=2)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=0.2,
            bos_token_id=2,
            eos_token_id=1,
        )
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def _randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """Perturb every norm weight / bias and every bias (HF initialises them to constants)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def make_tiny_hf_model(family: str, seed: int = 0):
    """``(hf_model, tokenizer)`` for ``family``: a random float32 causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_norms_and_biases(model, seed)
    return model.eval(), make_tiny_tokenizer(add_bos=family != "gpt2")


#: a ChatML template shaped like Qwen's: a default system prompt unless the first message is one
TINY_CHATML = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if not (loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_chat_adapter(seed: int = 0) -> ModelAdapter:
    """A tiny random Qwen2 chat model: character tokenizer plus ChatML's ``<|im_start|>`` and
    ``<|im_end|>`` special tokens, :data:`TINY_CHATML` as its chat template, no BOS added by the
    tokenizer (as Qwen's), 128 positions."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("qwen2")
    config.max_position_embeddings = 128
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_norms_and_biases(hf, seed)
    tokenizer = make_tiny_tokenizer(add_bos=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TINY_CHATML
    assert len(tokenizer) <= VOCAB_SIZE
    cls = adapter_class_for(hf.config.model_type)
    return cls(hf.eval(), tokenizer, "tiny-qwen2-chat")


def make_tiny_adapter(family: str, seed: int = 0) -> ModelAdapter:
    """A tiny random model of ``family`` wrapped in the adapter ``load_model`` would choose."""
    hf, tokenizer = make_tiny_hf_model(family, seed)
    cls = adapter_class_for(hf.config.model_type)
    return cls(hf, tokenizer, f"tiny-{family}")


# ------------------------------------------------------------------------------------ transcoders
def make_tiny_transcoders(
    adapter: ModelAdapter,
    d_transcoder: int = 48,
    activation: str = "jumprelu",
    skip: bool = False,
    k: int = 8,
    threshold: float = 0.5,
    seed: int = 0,
) -> PerLayerTranscoderSet:
    """A random :class:`PerLayerTranscoderSet` sized for ``adapter``.

    Encoder rows are scaled by the RMS of each layer's MLP input on :data:`TINY_PROMPT`, so
    pre-activations are roughly standard normal; JumpReLU thresholds are uniform in
    ``[threshold / 2, threshold]`` and encoder biases small, so a third or so of the features fire
    on each token. Decoder rows are scaled so the reconstruction is about as large as the MLP
    output.

    Args:
        d_transcoder: features per layer.
        activation: ``jumprelu`` | ``relu`` | ``topk``.
        skip: whether to give each transcoder a random ``W_skip``.
        k: TopK's k (only for ``topk``).
        threshold: upper end of the JumpReLU thresholds.
        seed: random seed of the weights.
    """
    gen = torch.Generator().manual_seed(seed)
    d_model = adapter.d_model
    ids = adapter.tokenize(TINY_PROMPT)
    mlp_inputs, mlp_outputs = adapter.run_with_mlp_sites(ids[None])
    transcoders = []
    for layer in range(adapter.n_layers):
        in_rms = mlp_inputs[layer][0, 1:].pow(2).mean().sqrt()
        out_rms = mlp_outputs[layer][0, 1:].pow(2).mean().sqrt()
        tc = PerLayerTranscoder(
            d_model,
            d_transcoder,
            activation=activation,
            k=k if activation == "topk" else None,
            skip_connection=skip,
        )
        with torch.no_grad():
            # W_enc, W_dec: (d_transcoder, d_model); W_skip: (d_model, d_model)
            W_enc = torch.randn(d_transcoder, d_model, generator=gen)
            tc.W_enc.copy_(W_enc / (d_model**0.5 * in_rms))
            tc.b_enc.copy_(0.1 * torch.randn(d_transcoder, generator=gen))
            # about a third of the features fire, so the output sums ~d_transcoder / 3 rows
            W_dec = torch.randn(d_transcoder, d_model, generator=gen)
            tc.W_dec.copy_(W_dec * out_rms / d_transcoder**0.5)
            tc.b_dec.copy_(0.1 * out_rms * torch.randn(d_model, generator=gen))
            if skip:
                W_skip = torch.randn(d_model, d_model, generator=gen)
                tc.W_skip.copy_(W_skip * 0.3 * out_rms / (d_model**0.5 * in_rms))
        if activation == "jumprelu":
            thresholds = threshold * (0.5 + 0.5 * torch.rand(d_transcoder, generator=gen))
            tc.activation_function = make_activation("jumprelu", d_transcoder, threshold=thresholds)
        tc.requires_grad_(False)
        transcoders.append(tc)
    scan = f"{adapter.name}-tiny-plt"
    return PerLayerTranscoderSet(transcoders, model_name=adapter.name, scan=scan)


def make_tiny_clt(adapter: ModelAdapter, d_transcoder: int = 32, skip: bool = False,
                  seed: int = 0) -> CrossLayerTranscoderSet:
    """A random JumpReLU CLT sized for ``adapter``: pre-activations about standard normal, a third of
    the features firing, each feature writing to every later layer (``W_dec[layer]``:
    ``(d_transcoder, n_layers - layer, d_model)``)."""
    gen = torch.Generator().manual_seed(seed)
    n_layers, d_model = adapter.n_layers, adapter.d_model
    ins, outs = adapter.run_with_mlp_sites(adapter.tokenize(TINY_PROMPT)[None])
    clt = CrossLayerTranscoderSet(n_layers, d_model, d_transcoder, "jumprelu", skip_connection=skip,
                                  model_name=adapter.name, scan=f"{adapter.name}-tiny-clt")
    with torch.no_grad():
        for layer in range(n_layers):
            in_rms = ins[layer][0, 1:].pow(2).mean().sqrt()
            out_rms = outs[layer][0, 1:].pow(2).mean().sqrt()
            clt.W_enc[layer].copy_(torch.randn(d_transcoder, d_model, generator=gen) / (d_model**0.5 * in_rms))
            clt.b_enc[layer].copy_(0.1 * torch.randn(d_transcoder, generator=gen))
            clt.b_dec[layer].copy_(0.1 * out_rms * torch.randn(d_model, generator=gen))
            n_out = n_layers - layer
            clt.W_dec[layer].copy_(torch.randn(d_transcoder, n_out, d_model, generator=gen) * out_rms
                                   / (d_transcoder * n_out) ** 0.5)
            if skip:
                W_skip = torch.randn(d_model, d_model, generator=gen)
                clt.W_skip[layer].copy_(W_skip * 0.3 * out_rms / (d_model**0.5 * in_rms))
            thresholds = 0.5 * (0.5 + 0.5 * torch.rand(d_transcoder, generator=gen))
            clt.activation_functions[layer] = make_activation("jumprelu", d_transcoder, threshold=thresholds)
    return clt.requires_grad_(False)


def make_tiny_set(adapter: ModelAdapter, kind: str, d_transcoder: int = 48, skip: bool = False,
                  seed: int = 0) -> TranscoderSet:
    """A random JumpReLU set of ``kind`` (one of :data:`SET_KINDS`) sized for ``adapter``:
    :func:`make_tiny_transcoders` or :func:`make_tiny_clt`, ``d_transcoder`` features per layer."""
    if kind == "per-layer":
        return make_tiny_transcoders(adapter, d_transcoder, skip=skip, seed=seed)
    if kind == "cross-layer":
        return make_tiny_clt(adapter, d_transcoder, skip=skip, seed=seed)
    raise ValueError(f"unknown transcoder set kind {kind!r}; choose one of {SET_KINDS}")


def random_set(
    n_layers: int = 2,
    d_model: int = 16,
    d_transcoder: int = 24,
    activation: str = "jumprelu",
    skip: bool = True,
    k: int = 4,
    seed: int = 0,
    model_name: str = "tiny",
) -> PerLayerTranscoderSet:
    """A set with every parameter random (non-zero biases, thresholds in [0.1, 0.6])."""
    gen = torch.Generator().manual_seed(seed)
    transcoders = []
    for _ in range(n_layers):
        tc = PerLayerTranscoder(d_model, d_transcoder, activation, k if activation == "topk" else None, skip)
        with torch.no_grad():
            for param in tc.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) / d_model**0.5)
            if activation == "jumprelu":
                tc.activation_function.threshold.copy_(0.1 + 0.5 * torch.rand(d_transcoder, generator=gen))
        transcoders.append(tc.requires_grad_(False))
    return PerLayerTranscoderSet(transcoders, model_name=model_name, scan="tiny-plt")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True, scope="session")
def _light_torch():
    """Tiny models gain nothing from threads; keep CPU use light next to long-running jobs (the
    CLI, run in-process, then keeps one thread too: ``MECHSCOPE_THREADS``)."""
    import os

    os.environ.setdefault("MECHSCOPE_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_adapter() -> Callable[[str], ModelAdapter]:
    """Factory ``tiny_adapter(family)`` returning a cached tiny adapter per family.

    The adapters are shared across the session: do not modify their weights in a test (build a
    fresh one with :func:`make_tiny_adapter` instead).
    """
    cache: dict[str, ModelAdapter] = {}

    def get(family: str) -> ModelAdapter:
        if family not in cache:
            cache[family] = make_tiny_adapter(family)
        return cache[family]

    return get


@pytest.fixture(scope="session", name="make_tiny_transcoders")
def make_tiny_transcoders_fixture() -> Callable[..., PerLayerTranscoderSet]:
    """Factory ``make_tiny_transcoders(adapter, d_transcoder=48, activation="jumprelu",
    skip=False)``; see :func:`make_tiny_transcoders`."""
    return make_tiny_transcoders


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Parametrise a test over every supported model family."""
    return request.param
