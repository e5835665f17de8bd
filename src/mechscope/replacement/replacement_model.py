"""The local replacement model: a model's MLPs replaced by transcoders, made exact by error nodes.

For one prompt (Ameisen et al. 2025, "Circuit Tracing", sections 2.2-2.3):

- a clean forward pass records every layer's MLP input ``x`` and output ``y``, the attention
  patterns and the norm scales;
- the transcoders encode ``x`` into feature activations ``a`` and reconstruct ``y_hat``;
- the *error* ``y - y_hat`` is kept as a node, so that the replacement (features + errors) reproduces
  the model's MLP outputs, and with them its logits, exactly;
- with attention patterns and norm scales frozen, the map from the *sources* (token embeddings,
  feature decoder outputs, errors) to every later site is linear: :class:`FrozenReplacement` builds
  that graph once and returns gradients at the source sites for batches of injected target vectors.

Position 0 holds the BOS token when the tokenizer prepends one; like circuit-tracer, it gets no
feature or error nodes: its MLP outputs are constants of the replacement model plus, for
transcoders with a skip connection, the skip path, which stays live there as in circuit-tracer
(so the BOS token's edges include paths through it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from mechscope.errors import BadInputError, IncompatibleTranscodersError
from mechscope.models.adapter import CleanRun, FrozenState, ModelAdapter
from mechscope.transcoders.transcoder import TranscoderSet

logger = logging.getLogger(__name__)

__all__ = ["ReplacementModel", "Trace", "FrozenReplacement", "place_transcoders"]


@dataclass
class Trace:
    """A prompt traced through the replacement model.

    Attributes:
        run: the clean forward pass.
        activations: per layer ``[pos, d_transcoder]`` feature activations (zero at skipped pos).
        reconstructions: per layer ``[pos, d_model]`` transcoder outputs (with ``b_dec`` and skip).
        errors: per layer ``[pos, d_model]`` ``y - y_hat`` (zero at skipped positions).
        first_pos: first position that has feature and error nodes (1 when position 0 is BOS).
        active: ``[n_active, 3]`` (layer, pos, feature) of every active feature, sorted (on the CPU).
        active_values: ``[n_active]`` their activations (on the CPU).
    """

    run: CleanRun
    activations: list[Float[torch.Tensor, "pos d_transcoder"]]
    reconstructions: list[Float[torch.Tensor, "pos d_model"]]
    errors: list[Float[torch.Tensor, "pos d_model"]]
    first_pos: int
    active: Int[torch.Tensor, "n_active 3"]
    active_values: Float[torch.Tensor, "n_active"]

    @property
    def n_pos(self) -> int:
        return len(self.run.input_ids)

    def prefix(self, n: int) -> Trace:
        """The trace of the first ``n`` positions, as a run on that prefix alone would record it
        (attention is causal, so every site and frozen pattern of an earlier position is the same);
        ``active`` keeps the whole prompt's index."""
        run = self.run
        frozen = FrozenState({layer: p[..., :n, :n] for layer, p in run.frozen.patterns.items()},
                             {key: s[:, :n] for key, s in run.frozen.norm_scales.items()})
        short = CleanRun(run.input_ids[:n], run.embeddings[:n], [x[:n] for x in run.mlp_inputs],
                         [y[:n] for y in run.mlp_outputs], run.final_hidden[:n], run.logits, frozen)
        return Trace(short, [a[:n] for a in self.activations], [r[:n] for r in self.reconstructions],
                     [e[:n] for e in self.errors], self.first_pos, self.active, self.active_values)


class ReplacementModel:
    """A model adapter paired with a transcoder set.

    A set that records another model (``model_name`` in its ``config.yaml``, canonical ids compared)
    with the right shapes is accepted with a warning: a base model's set on its fine-tune is a known
    technique, but it should never happen by accident.

    Raises:
        IncompatibleTranscodersError: the set's ``d_model`` or layer count differs from the model's.
    """

    def __init__(self, model: ModelAdapter, transcoders: TranscoderSet, max_prompt_tokens: int = 1024):
        if transcoders.d_model != model.d_model or transcoders.n_layers != model.n_layers:
            raise IncompatibleTranscodersError(
                f"transcoder set {transcoders.scan!r} has d_model={transcoders.d_model}, "
                f"{transcoders.n_layers} layers; model {model.name!r} has d_model={model.d_model}, "
                f"{model.n_layers} layers"
            )
        from mechscope.models.loading import model_name_for

        if transcoders.model_name and model.name and model_name_for(transcoders.model_name) != model_name_for(model.name):
            # allowed (a base model's set on a fine-tune is a known technique), but never silently
            logger.warning("transcoder set %r was trained on %r, not on %r: its features may not fit this model",
                           transcoders.scan, transcoders.model_name, model.name)
        self.model, self.transcoders = model, transcoders
        self.max_prompt_tokens = max_prompt_tokens
        place_transcoders(transcoders, model)

    def tokenize(self, prompt: str) -> Int[torch.Tensor, "pos"]:
        """Token ids of ``prompt``.

        Raises:
            BadInputError: empty prompt or longer than ``max_prompt_tokens``.
        """
        ids = self.model.tokenize(prompt)
        if len(ids) > self.max_prompt_tokens:
            raise BadInputError(
                f"the prompt has {len(ids)} tokens, over the limit of {self.max_prompt_tokens}; "
                "shorten it or raise the limit (--max-prompt-tokens)"
            )
        return ids

    @torch.no_grad()
    def trace(self, input_ids: Int[torch.Tensor, "pos"], release_vocabulary: bool = False,
              release_mlps: bool = False) -> Trace:
        """Clean run, feature activations, reconstructions and errors of one prompt
        (``release_vocabulary``, ``release_mlps``: see :meth:`ModelAdapter.clean_run`)."""
        run = self.model.clean_run(input_ids, release_vocabulary, release_mlps)
        first = 1 if self.model.has_bos(input_ids) else 0
        acts, recons, errors, rows, values = [], [], [], [], []
        for layer in range(self.model.n_layers):
            x = run.mlp_inputs[layer].float()
            a = self.transcoders.encode(layer, x)
            a[:first] = 0
            acts.append(a)
        recons = self.transcoders.reconstruct(acts, [x.float() for x in run.mlp_inputs])
        for layer in range(self.model.n_layers):
            err = run.mlp_outputs[layer].float() - recons[layer]
            err[:first] = 0
            errors.append(err)
            pos, feat = acts[layer].nonzero(as_tuple=True)
            rows.append(torch.stack([torch.full_like(pos, layer), pos, feat], dim=1).cpu())
            values.append(acts[layer][pos, feat].cpu())
        # the index of active features is held on the CPU (with a device map the layers' are on several devices)
        return Trace(run, acts, recons, errors, first, torch.cat(rows), torch.cat(values))

    @torch.no_grad()
    def replacement_logits(self, trace: Trace) -> Float[torch.Tensor, "vocab"]:
        """Last-position logits of the replacement model (live attention and norms; MLPs replaced
        by transcoders recomputed from their live inputs, plus the frozen error terms). Equals the
        model's logits up to float error, a check of the whole replacement."""
        first = trace.first_pos
        live: list[torch.Tensor] = []  # each layer's live activations, for the layers after it (CLT)

        def replacement(layer: int):
            def fn(x: torch.Tensor) -> torch.Tensor:
                live.append(self.transcoders.encode(layer, x))
                out = self.decode_upto(layer, live, x) + trace.errors[layer]
                out[:, :first] = trace.run.mlp_outputs[layer][:first]
                return out

            return fn

        final = self.model.patched_forward(
            trace.run.input_ids,
            trace.run.embeddings[None],
            [replacement(layer) for layer in range(self.model.n_layers)],
        )
        return self.model.output_logits(final[0, -1])

    def decode_upto(
        self, layer: int, acts: list[torch.Tensor], x: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... d_model"]:
        """Transcoder output at ``layer`` from the activations ``acts[0..layer]`` of that layer and
        every earlier one (a cross-layer set's features write forward; a per-layer set reads only
        ``acts[layer]``), with ``b_dec`` and the skip path of ``x``, ``layer``'s MLP input."""
        zeros = torch.zeros_like(acts[layer])
        full = list(acts[: layer + 1]) + [zeros] * (self.model.n_layers - layer - 1)
        return self.transcoders.reconstruct(full, [x] * self.model.n_layers)[layer]


def place_transcoders(transcoders: TranscoderSet, model: ModelAdapter) -> None:
    """Move a set to where its model runs: each per-layer transcoder onto its layer's device (one
    device, or a layer's own under a device map); a cross-layer set, whose features write to
    later layers, onto the model's first device.

    Raises:
        BadInputError: a cross-layer set with a model spread over several devices.
    """
    from mechscope.devices import layer_devices

    devices = layer_devices(model.hf, model.n_layers)
    if len(set(devices)) > 1 and transcoders.kind == "cross-layer":
        raise BadInputError("a cross-layer transcoder writes to every later layer and runs on one device; "
                            "load the model without --device-map, or use a per-layer set")
    if hasattr(transcoders, "transcoders") and len(set(devices)) > 1:
        for layer, device in enumerate(devices):
            transcoders.transcoders[layer].to(device)
    elif next(transcoders.parameters()).device != devices[0]:
        transcoders.to(devices[0])


class FrozenReplacement:
    """The frozen local replacement model, built once per prompt and back-propagated in batches of
    ``batch`` targets.

    Sources are leaves of the autograd graph: the embedding ``[1, pos, d_model]`` and, per
    layer, the MLP output without its skip path. The frozen model is linear in its sources and saves
    only weights and frozen patterns for its backward pass, so one forward pass of a single copy
    serves every batch: :meth:`gradients` back-propagates a batch of ``batch`` injections at once
    through it with ``torch.autograd.grad(..., is_grads_batched=True)`` (the same numbers as a
    forward pass of ``batch`` copies, without holding ``batch`` copies of every leaf and every MLP
    input; circuit-tracer expands the prompt to the batch size instead). A layer's MLP output is
    ``leaf + W_skip x`` where ``x`` is the (live, linear) MLP input, at every position (before
    ``first_pos`` the leaf is a constant with no node). :meth:`gradients` back-propagates injected
    vectors at MLP inputs and at the final-norm output (logit directions) to those leaves.

    The graph runs in the model's dtype (float32, or bfloat16 for ``mechscope trace --dtype
    bfloat16``); the transcoders' skip path is computed in float32 and gradients come back as float32.
    """

    def __init__(self, rm: ReplacementModel, trace: Trace, batch: int):
        model, tcs = rm.model, rm.transcoders
        run = trace.run
        dtype = model.dtype
        self.batch, self.n_layers = batch, model.n_layers
        self.embed_leaf = run.embeddings.to(dtype)[None].clone().requires_grad_(True)
        self.mlp_leaves = []
        replacements = []
        for layer in range(model.n_layers):
            x = run.mlp_inputs[layer].float()
            skip = tcs.skip(layer, x)
            constant = run.mlp_outputs[layer].float() - (skip if skip is not None else 0.0)
            leaf = constant.to(dtype)[None].requires_grad_(True)
            self.mlp_leaves.append(leaf)
            replacements.append(self._replacement(tcs, layer, leaf))
        self.mlp_inputs: dict[int, torch.Tensor] = {}
        with torch.enable_grad():
            self.final = model.frozen_forward(
                run.input_ids,
                run.frozen,
                self.embed_leaf,
                replacements,
                on_mlp_input=lambda layer, x: self.mlp_inputs.__setitem__(layer, x),
            )

    @staticmethod
    def _replacement(tcs: TranscoderSet, layer: int, leaf: torch.Tensor):
        def fn(x: torch.Tensor) -> torch.Tensor:
            skip = tcs.skip(layer, x.float())
            return leaf if skip is None else leaf + skip.to(leaf.dtype)

        return fn

    def gradients(
        self,
        mlp_input_injections: dict[int, Float[torch.Tensor, "batch pos d_model"]],
        final_injection: Float[torch.Tensor, "batch pos d_model"] | None,
        retain_graph: bool = True,
        n_source_layers: int | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Back-propagate injected vectors to the source sites.

        Args:
            mlp_input_injections: layer -> ``[batch, pos, d_model]`` vectors dotted with that
                layer's MLP input (feature encoder rows for feature targets).
            final_injection: ``[batch, pos, d_model]`` vectors dotted with the final-norm output
                (demeaned unembedding rows for logit targets), or ``None``.
            n_source_layers: return gradients at the MLP outputs of layers ``< n_source_layers``
                only (default: all); with injections below that layer only, autograd then walks
                only the layers below it.

        Returns:
            ``(gradients at MLP outputs [batch, pos, d_model] of layers < n_source_layers,
            gradient at the embedding)``.
        """
        outputs, grads = [], []
        for layer, vec in mlp_input_injections.items():
            outputs.append(self.mlp_inputs[layer])
            grads.append(vec.to(self.mlp_inputs[layer].device, self.mlp_inputs[layer].dtype)[:, None])  # [batch, 1, pos, d]
        if final_injection is not None:
            outputs.append(self.final)
            grads.append(final_injection.to(self.final.device, self.final.dtype)[:, None])
        batch = len(grads[0])
        inputs = [*self.mlp_leaves[: n_source_layers], self.embed_leaf]
        result = torch.autograd.grad(outputs, inputs, grads, retain_graph=retain_graph, allow_unused=True,
                                     is_grads_batched=True)
        result = [torch.zeros((batch, *i.shape[1:]), device=i.device) if r is None else r[:, 0].float() for r, i in zip(result, inputs)]
        return result[:-1], result[-1]
