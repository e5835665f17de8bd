"""`ModelAdapter`: one narrow interface over Hugging Face causal LMs.

mechscope needs few things from a host model: tokenize; run the body and read each layer's MLP
input (what a transcoder reads) and MLP output (what it reconstructs); run the body again with
attention patterns and norm scales frozen and MLP outputs replaced (the local replacement model);
the unembedding ``W_U`` and the final norm. Each architecture family is a subclass in its own file
that names where those sites are (``gemma3.py``, ``llama.py``, ...).

Site conventions (the same ones Gemma Scope 2 and circuit-tracer use):

- *MLP input* ``x``: the input of the layer's ``mlp`` module (for Gemma the output of
  ``pre_feedforward_layernorm``; for Llama ``post_attention_layernorm``; for GPT-2 ``ln_2``).
- *MLP output* ``y``: what the MLP block adds to the residual stream (for Gemma the output of
  ``post_feedforward_layernorm``; elsewhere the ``mlp`` module's output).
- *Embedding*: the input of the first decoder layer (token embedding with any scale, plus learned
  positions for GPT-2).
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import nn

from mechscope.errors import BadInputError
from mechscope.memory import release_free_memory, release_pages
from mechscope.models.attention import PatternState, use_mechscope_attention

__all__ = ["ModelAdapter", "CleanRun", "FrozenState"]


@dataclass
class CleanRun:
    """Everything recorded on one real forward pass of one prompt (batch 1).

    Attributes:
        input_ids: ``[pos]`` token ids, BOS included where the tokenizer adds one.
        embeddings: ``[pos, d_model]`` residual stream entering layer 0.
        mlp_inputs: per layer ``[pos, d_model]``, the transcoder input sites.
        mlp_outputs: per layer ``[pos, d_model]``, the transcoder output sites.
        final_hidden: ``[pos, d_model]`` output of the final norm (input of ``W_U``).
        logits: ``[vocab]`` next-token logits at the last position.
        frozen: attention patterns and norm scales, for the local replacement model.
    """

    input_ids: Int[torch.Tensor, "pos"]
    embeddings: Float[torch.Tensor, "pos d_model"]
    mlp_inputs: list[Float[torch.Tensor, "pos d_model"]]
    mlp_outputs: list[Float[torch.Tensor, "pos d_model"]]
    final_hidden: Float[torch.Tensor, "pos d_model"]
    logits: Float[torch.Tensor, "vocab"]
    frozen: FrozenState


@dataclass
class FrozenState:
    """Attention patterns and norm scales of one forward pass.

    ``patterns[layer]`` is ``[1, n_heads, pos, pos]``; ``norm_scales[id(module)]`` is
    ``[1, pos, 1]``, the reciprocal root-mean-square (or standard deviation for LayerNorm) that
    the norm divided by. Ameisen et al. 2025, "Circuit Tracing", section "Local replacement model".
    """

    patterns: dict[int, torch.Tensor] = field(default_factory=dict)
    norm_scales: dict[int, torch.Tensor] = field(default_factory=dict)


def _release_parameter_pages(module: nn.Module, args, output) -> None:
    """Forward hook: release the pages of the module's weights once it has run (output unchanged)."""
    for parameter in module.parameters():
        release_pages(parameter)


class ModelAdapter:
    """Base adapter; subclasses name the architecture's modules.

    Args:
        hf_model: a ``transformers`` causal LM (``...ForCausalLM``), in eval mode.
        tokenizer: its tokenizer.
        name: the name the model was loaded by (recorded in graphs).

    Subclasses set ``family`` and override :meth:`layer_norms`, :meth:`mlp_output_modules`,
    :meth:`normalize` and, where needed, :meth:`final_norm`.
    """

    family: str = "base"
    #: model_type values of ``config.json`` this adapter handles
    model_types: tuple[str, ...] = ()

    def __init__(self, hf_model: nn.Module, tokenizer, name: str):
        self.hf = hf_model.eval()
        self._tokenizer = tokenizer
        #: how to load the tokenizer again after :meth:`release_tokenizer` (``None``: it is never released)
        self.tokenizer_loader: Callable[[], object] | None = None
        self.name = name
        self.config = hf_model.config
        for p in self.hf.parameters():
            p.requires_grad_(False)

    @property
    def tokenizer(self):
        """The model's tokenizer (loaded again on first use after :meth:`release_tokenizer`)."""
        if self._tokenizer is None:
            if self.tokenizer_loader is None:
                raise RuntimeError(f"{self.name}: the tokenizer was dropped and there is no loader to load it again")
            self._tokenizer = self.tokenizer_loader()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def release_tokenizer(self) -> bool:
        """Drop the tokenizer for a command that has decoded every string it needs; it is loaded
        again (about a second) if anything asks for it. Gemma 3's 262,144-token fast tokenizer holds
        about 280 MB, a fifth of ``mechscope trace``'s peak on a short prompt. Returns whether it was
        dropped: only a tokenizer with a :attr:`tokenizer_loader` (set by
        :func:`mechscope.models.loading.load_model`) is."""
        if self.tokenizer_loader is None or self._tokenizer is None:
            return False
        self._tokenizer = None
        gc.collect()  # the Rust tokenizer's memory goes back to the heap with its Python object
        release_free_memory()
        return True

    # ----------------------------------------------------------------- structure
    @property
    def body(self) -> nn.Module:
        """The decoder without the LM head (``model.model`` / ``model.transformer``)."""
        return self.hf.base_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.body.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.W_U.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (the first parameter's device: the embedding's, with a device map)."""
        return next(self.hf.parameters()).device

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"vocab={self.vocab_size}, dtype={str(self.dtype).removeprefix('torch.')}, device={self.device})")

    @property
    def W_U(self) -> Float[torch.Tensor, "vocab d_model"]:
        """Unembedding matrix, rows are tokens (``lm_head.weight``)."""
        return self.hf.get_output_embeddings().weight

    def _vocabulary_blocks(self, rows: int = 16384) -> list[torch.Tensor]:
        W_U = self.W_U
        return [W_U[start : start + rows] for start in range(0, W_U.shape[0], rows)]

    @staticmethod
    def _released_product(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        product = hidden @ rows.T
        release_pages(rows)
        return product

    def unembedding_mean(self, release_vocabulary: bool = False) -> Float[torch.Tensor, "1 d_model"]:
        """Mean unembedding row in float32 (logit targets are demeaned by it), summed over blocks of
        rows; with ``release_vocabulary`` each block's pages are released after use."""
        total = torch.zeros(1, self.d_model, device=self.W_U.device)
        for rows in self._vocabulary_blocks():
            total += rows.sum(0, keepdim=True, dtype=torch.float32)
            if release_vocabulary:
                release_pages(rows)
        return total / self.W_U.shape[0]

    def release_vocabulary_weights(self) -> int:
        """Let the kernel reclaim the pages of the embedding and unembedding matrices (their values
        are kept; see :func:`mechscope.memory.release_pages`). Attribution reads them only for the
        clean run and the logit targets; on Gemma 3 270M they are 671 MB of its 1,023 MB of float32
        weights. Returns the bytes released."""
        weights = {w.untyped_storage().data_ptr(): w for w in (self.W_U, self.hf.get_input_embeddings().weight)}
        return sum(release_pages(w) for w in weights.values())

    def release_weights(self) -> int:
        """Let the kernel reclaim the pages of every weight (values kept; they are read back from the
        file when the model runs again). For a command that is done with the model, such as
        ``mechscope trace`` once attribution has finished. Returns the bytes released."""
        return sum(release_pages(p) for p in self.hf.parameters())

    def final_norm(self) -> nn.Module:
        return self.body.norm

    def attention_modules(self) -> list[nn.Module]:
        """The attention module of every layer, in layer order."""
        return [layer.self_attn for layer in self.layers]

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def mlp_output_modules(self, layer: int) -> list[str]:
        """Attribute names on the decoder layer whose composition writes the MLP output to the
        residual stream, in call order (``["mlp"]``, or ``["mlp", "post_feedforward_layernorm"]``)."""
        return ["mlp"]

    def layer_norms(self, layer: int) -> list[nn.Module]:
        """Norm modules of a layer that act on the residual stream (not q/k norms, not the
        post-MLP norm, which is part of the MLP output site)."""
        raise NotImplementedError

    def normalize(self, module: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Apply norm ``module`` to ``x`` with a given (frozen) ``scale`` of shape ``[..., 1]``."""
        raise NotImplementedError

    def norm_scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The scale ``module`` divides by, as a multiplier ``[..., 1]`` (RMSNorm default)."""
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6))
        return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)

    def all_norms(self) -> list[nn.Module]:
        return [m for layer in range(self.n_layers) for m in self.layer_norms(layer)] + [
            self.final_norm()
        ]

    def output_logits(self, final_hidden: torch.Tensor, release_vocabulary: bool = False) -> torch.Tensor:
        """Logits from final-norm output (applies Gemma 2 style final soft-capping if set).

        With ``release_vocabulary`` the unembedding is read in blocks of rows whose pages are
        released as soon as they are used (:func:`mechscope.memory.release_pages`), so it is never
        resident whole; attribution's clean run reads it only here."""
        hidden = final_hidden.contiguous()  # a strided slice makes this matmul ~7x slower on CPU
        if release_vocabulary:
            logits = torch.cat([self._released_product(hidden, rows) for rows in self._vocabulary_blocks()], -1)
        else:
            logits = hidden @ self.W_U.T
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ----------------------------------------------------------------- tokenize
    def tokenize(self, prompt: str) -> Int[torch.Tensor, "pos"]:
        """Token ids of ``prompt`` with a start token at position 0, exactly once.

        Plain text gets the BOS token (the one the tokenizer adds, Gemma's id 2; or prepended, as
        for Qwen's ``<|endoftext|>`` and GPT-2). Text that already begins with the BOS (Gemma's
        rendered template writes ``<bos>``) gets no second one; text that opens with another special
        token, for a tokenizer that adds no BOS itself (Qwen's ``<|im_start|>``), is tokenized as
        written — nothing the model would not see from its own template, so a chat prompt's
        probabilities equal plain transformers' on the rendered text.

        Raises:
            BadInputError: for an empty prompt.
        """
        if not prompt or not prompt.strip():
            raise BadInputError("the prompt is empty; give some text to trace")
        bare = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids[0]
        bos = self.tokenizer.bos_token_id
        if len(bare) and (int(bare[0]) == bos or (int(bare[0]) in self._special_ids and len(ids) == len(bare))):
            # written with its BOS, or opening with a template token where the tokenizer adds none itself
            # (Qwen's <|im_start|>); Gemma chat text without <bos> still gets the BOS its tokenizer adds
            return bare
        if bos is not None and (len(ids) == 0 or ids[0] != bos) and self.prepends_bos:
            ids = torch.cat([torch.tensor([bos]), ids])
        return ids

    #: whether mechscope makes sure position 0 is BOS (and so gives it no feature nodes)
    prepends_bos: bool = True

    @property
    def _special_ids(self) -> set[int]:
        """The tokenizer's special tokens: the named ones and every added token marked special
        (a GGUF-converted Qwen tokenizer names only ``<|endoftext|>`` and ``<|im_end|>``)."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        return set(self.tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}

    def has_bos(self, input_ids: torch.Tensor) -> bool:
        """Whether position 0 holds a start token — the BOS or another special token such as a chat
        template's ``<|im_start|>`` — which, as in circuit-tracer, gets no feature or error nodes."""
        return len(input_ids) > 0 and int(input_ids[0]) in self._special_ids | {self.tokenizer.bos_token_id}

    def token_strings(self, input_ids: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode([int(t)]) for t in input_ids]

    # ----------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def _hooks(self) -> Iterator[list]:
        handles: list = []
        try:
            yield handles
        finally:
            for h in handles:
                h.remove()

    def _run_body(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=input_ids, use_cache=False).last_hidden_state

    def mlp_output_site(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.mlp_output_modules(layer)[-1])

    @torch.no_grad()
    def run_with_mlp_sites(
        self, input_ids: Int[torch.Tensor, "batch pos"], layers: list[int] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Forward pass of the body recording MLP inputs and outputs.

        Returns:
            ``(mlp_inputs, mlp_outputs)``, per requested layer ``[batch, pos, d_model]``.
        """
        layers = list(range(self.n_layers)) if layers is None else layers
        ins: dict[int, torch.Tensor] = {}
        outs: dict[int, torch.Tensor] = {}
        with self._hooks() as handles:
            for layer in layers:
                handles.append(
                    self.mlp(layer).register_forward_pre_hook(
                        lambda m, args, layer=layer: ins.__setitem__(layer, args[0])
                    )
                )
                handles.append(
                    self.mlp_output_site(layer).register_forward_hook(
                        lambda m, args, out, layer=layer: outs.__setitem__(layer, out)
                    )
                )
            self._run_body(input_ids.to(self.device))
        return [ins[layer] for layer in layers], [outs[layer] for layer in layers]

    @torch.no_grad()
    def clean_run(self, input_ids: Int[torch.Tensor, "pos"], release_vocabulary: bool = False,
                  release_mlps: bool = False) -> CleanRun:
        """Real forward pass of one prompt, recording every site and the frozen state
        (``release_vocabulary``: see :meth:`output_logits`; ``release_mlps``: each MLP's weight pages
        are released as soon as it has run, values kept as for :meth:`release_weights`; attribution
        reads them only here, since its frozen passes put the transcoders in the MLPs' place, and on
        Gemma 3 270M they are 283 MB of float32)."""
        frozen = FrozenState()
        ins: dict[int, torch.Tensor] = {}
        outs: dict[int, torch.Tensor] = {}
        embed: list[torch.Tensor] = []
        with self._hooks() as handles, use_mechscope_attention(self, record=frozen.patterns):
            handles.append(
                self.layers[0].register_forward_pre_hook(
                    lambda m, args, kwargs: embed.append(_hidden_arg(args, kwargs)),
                    with_kwargs=True,
                )
            )
            for layer in range(self.n_layers):
                handles.append(
                    self.mlp(layer).register_forward_pre_hook(
                        lambda m, args, layer=layer: ins.__setitem__(layer, args[0][0])
                    )
                )
                handles.append(
                    self.mlp_output_site(layer).register_forward_hook(
                        lambda m, args, out, layer=layer: outs.__setitem__(layer, out[0])
                    )
                )
                if release_mlps:
                    handles.append(self.mlp(layer).register_forward_hook(_release_parameter_pages))
            for norm in self.all_norms():
                handles.append(
                    norm.register_forward_pre_hook(
                        lambda m, args: frozen.norm_scales.__setitem__(
                            id(m), self.norm_scale(m, args[0])
                        )
                    )
                )
            final = self._run_body(input_ids.to(self.device)[None])[0]
        return CleanRun(
            input_ids=input_ids,
            embeddings=embed[0][0],
            mlp_inputs=[ins[layer] for layer in range(self.n_layers)],
            mlp_outputs=[outs[layer] for layer in range(self.n_layers)],
            final_hidden=final,
            logits=self.output_logits(final[-1], release_vocabulary),
            frozen=frozen,
        )

    def patched_forward(
        self,
        input_ids: Int[torch.Tensor, "pos"],
        embeddings: Float[torch.Tensor, "batch pos d_model"],
        mlp_replacements: list[Callable[[torch.Tensor], torch.Tensor]] | None = None,
        frozen: FrozenState | None = None,
        on_mlp_input: Callable[[int, torch.Tensor], None] | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Forward pass of the body with its MLP blocks replaced and, optionally, frozen.

        With ``frozen`` given this is the local replacement model of Ameisen et al. 2025
        ("Circuit Tracing", section 2.3): attention patterns and norm scales are replayed from the
        clean run instead of recomputed. Together with MLP outputs that do not depend on their
        input (stop-gradients) the map from embeddings and MLP outputs to any later site is then
        linear, so gradients of this pass are the Jacobian J▼ attribution edges are made of.
        Without ``frozen`` attention and norms are live (interventions, the replacement model's
        logits).

        Args:
            input_ids: ``[pos]`` the prompt (positions and masks come from it).
            embeddings: ``[batch, pos, d_model]`` residual stream entering layer 0.
            mlp_replacements: per layer, maps the MLP input ``[batch, pos, d_model]`` to the MLP
                output (the whole block: for Gemma after ``post_feedforward_layernorm``);
                ``None`` keeps the real MLPs.
            frozen: patterns and norm scales to replay, or ``None`` for live ones.
            on_mlp_input: called with ``(layer, mlp_input)`` at each replaced layer.

        Returns:
            ``[batch, pos, d_model]`` output of the final norm.
        """
        batch = embeddings.shape[0]
        ids = input_ids.to(embeddings.device)[None].expand(batch, -1)
        saved: list[tuple[nn.Module, str, nn.Module]] = []
        attention = (
            use_mechscope_attention(self, frozen=frozen.patterns) if frozen else contextlib.nullcontext()
        )
        with self._hooks() as handles, attention, contextlib.ExitStack() as stack:
            handles.append(
                self.layers[0].register_forward_pre_hook(
                    lambda m, args, kwargs: _replace_hidden_arg(args, kwargs, embeddings),
                    with_kwargs=True,
                )
            )
            if frozen:
                stack.enter_context(self._frozen_norms(frozen.norm_scales))
            for layer in range(self.n_layers) if mlp_replacements is not None else []:
                block = self.layers[layer]
                names = self.mlp_output_modules(layer)
                replacement = _Replacement(layer, mlp_replacements[layer], on_mlp_input)
                saved.append((block, names[0], getattr(block, names[0])))
                setattr(block, names[0], replacement)
                for extra in names[1:]:
                    saved.append((block, extra, getattr(block, extra)))
                    setattr(block, extra, nn.Identity())
            try:
                return self._run_body(ids)
            finally:
                for block, attr, module in reversed(saved):
                    setattr(block, attr, module)


    @torch.no_grad()
    def edited_forward(
        self,
        input_ids: Int[torch.Tensor, "batch pos"],
        edit_mlp_output: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
        patterns: dict[int, torch.Tensor] | None = None,
        norm_scales: dict[int, torch.Tensor] | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Forward pass of the real model whose MLP outputs pass through ``edit_mlp_output``.

        The real MLPs run; after each layer's MLP output site ``edit_mlp_output(layer, x, y)``
        returns the output to use, from the layer's MLP input ``x`` and real output ``y`` (both
        ``[batch, pos, d_model]``). Interventions add feature decoder deltas here (Ameisen et al.
        2025, "Circuit Tracing", section "Intervention experiments").

        Args:
            patterns: attention patterns to replay (``FrozenState.patterns``), or ``None`` for
                live attention; they must cover the whole sequence.
            norm_scales: norm scales to replay (``FrozenState.norm_scales``), or ``None``.

        Returns:
            ``[batch, pos, d_model]`` output of the final norm.
        """
        inputs: dict[int, torch.Tensor] = {}
        attention = (
            use_mechscope_attention(self, frozen=patterns) if patterns is not None else contextlib.nullcontext()
        )
        frozen_norms = self._frozen_norms(norm_scales) if norm_scales is not None else contextlib.nullcontext()
        with self._hooks() as handles, attention, frozen_norms:
            for layer in range(self.n_layers):
                handles.append(
                    self.mlp(layer).register_forward_pre_hook(
                        lambda m, args, layer=layer: inputs.__setitem__(layer, args[0])
                    )
                )
                handles.append(
                    self.mlp_output_site(layer).register_forward_hook(
                        lambda m, args, out, layer=layer: edit_mlp_output(layer, inputs[layer], out)
                    )
                )
            return self._run_body(input_ids.to(self.device))

    @contextlib.contextmanager
    def _frozen_norms(self, norm_scales: dict[int, torch.Tensor]) -> Iterator[None]:
        """Every residual norm applies its recorded scale instead of computing one: its forward is
        replaced (not hooked), so the live norm neither runs nor keeps tensors for autograd."""
        norms = self.all_norms()
        try:
            for norm in norms:
                norm.forward = functools.partial(self.normalize, norm, scale=norm_scales[id(norm)])
            yield
        finally:
            for norm in norms:
                norm.__dict__.pop("forward", None)

    def frozen_forward(self, input_ids, frozen: FrozenState, embeddings, mlp_replacements, on_mlp_input=None):
        """The local replacement model's forward pass: :meth:`patched_forward` with ``frozen``."""
        return self.patched_forward(input_ids, embeddings, mlp_replacements, frozen, on_mlp_input)


def scale_frozen(x: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``x * rows * columns``: a frozen norm's linear map (``rows [..., pos, 1]`` the recorded scale,
    ``columns [d_model]`` the gain), float32.

    Its backward pass multiplies the gradient once, by ``rows * columns`` formed from the two small
    factors (the plain expression multiplies a ``[batch, pos, d_model]`` gradient twice: a sixth of a
    batched backward pass of Gemma 3 270M at 516 tokens). Where a factor needs a gradient (not in a
    frozen pass) it is the plain expression.
    """
    if rows.requires_grad or columns.requires_grad:
        return x * rows * columns
    return _ScaleFrozen.apply(x, rows, columns)


class _ScaleFrozen(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, rows, columns):
        return x * rows * columns

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad):
        rows, columns = ctx.saved_tensors
        return grad * (rows * columns), None, None


class _Replacement(nn.Module):
    """Stands in for a layer's MLP block during :meth:`ModelAdapter.patched_forward`."""

    def __init__(self, layer: int, fn, on_input):
        super().__init__()
        self.layer, self.fn, self.on_input = layer, fn, on_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_input is not None:
            self.on_input(self.layer, x)
        return self.fn(x)


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden_arg(args: tuple, kwargs: dict, hidden: torch.Tensor):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
