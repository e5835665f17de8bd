"""Run interventions on the real model and read out what changed.

An intervention changes a feature's activation from ``a`` to ``a'`` and adds the decoder delta
``(a' - a) * W_dec[f]`` to the MLP outputs the feature writes to (for a cross-layer transcoder,
every output layer); an error intervention adds ``(M - 1) * (y - y_hat)``. The real MLPs still run,
so everything the transcoders do not explain is kept (Ameisen et al. 2025, "Circuit Tracing",
section "Intervention experiments"; circuit-tracer's ``feature_intervention`` has the same modes).

Modes (:class:`InterventionConfig`):

- ``freeze_attention``: attention patterns replay the clean run's (the first forward pass only;
  generated positions have no clean pattern);
- ``constrained_layers``: inside this layer range every MLP output is clamped to its clean value
  plus the intervention deltas (plus the change of the transcoder skip path, a linear part of the
  replacement model), so effects cannot travel through downstream features; when the range covers
  every layer the norm scales are frozen too and the pass is the frozen local replacement model, in
  which an edge of the attribution graph predicts a direct effect exactly;
- otherwise *iterative* patching: features are recomputed from live MLP inputs at every layer and
  the deltas are taken against those live activations;
- during generation, interventions apply at prompt positions, and with ``open_ended`` also at every
  generated position (targets with ``positions=None``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int

from mechscope.errors import BadInputError
from mechscope.interventions.records import ErrorTarget, FeatureTarget, Intervention
from mechscope.replacement.replacement_model import ReplacementModel, Trace

__all__ = ["InterventionConfig", "InterventionResult", "SupernodeReadout", "run_interventions", "BatchEditor",
           "sample_with_interventions"]


@dataclass(frozen=True)
class InterventionConfig:
    """How interventions are applied.

    Attributes:
        freeze_attention: replay the clean attention patterns (first forward pass).
        constrained_layers: ``range`` of layers whose MLP outputs are clamped (``None``: iterative).
        generate: tokens to generate after the prompt (0: next-token readout only).
        open_ended: also intervene at generated positions (targets with ``positions=None``).
        temperature: 0 for greedy decoding, else sampling temperature (seeded by ``seed``).
        top_k: how many next-token probabilities to report.
    """

    freeze_attention: bool = True
    constrained_layers: range | None = None
    generate: int = 0
    open_ended: bool = False
    temperature: float = 0.0
    seed: int = 0
    top_k: int = 10


@dataclass
class SupernodeReadout:
    """Activations of a supernode's feature members, clean and under the intervention.

    Attributes:
        members: ``(layer, feature, pos)`` per member.
        clean, intervened: ``[n_members]`` activations.
    """

    members: list[tuple[int, int, int]]
    clean: Float[torch.Tensor, "n"]
    intervened: Float[torch.Tensor, "n"]

    @property
    def percent_of_clean(self) -> float:
        """Summed intervened activation as a percentage of the summed clean activation."""
        total = float(self.clean.sum())
        return float("nan") if total == 0 else 100.0 * float(self.intervened.sum()) / total


@dataclass(repr=False)
class InterventionResult:
    """Clean and intervened next-token distributions, continuations and readouts.

    Attributes:
        clean_logits, intervened_logits: ``[vocab]`` logits after the prompt.
        clean_continuation, intervened_continuation: generated token ids (``config.generate``).
        readouts: supernode label -> :class:`SupernodeReadout`.
        mlp_inputs: per layer ``[pos, d_model]`` MLP inputs of the intervened prompt pass (what
            every feature's pre-activation is computed from).
    """

    input_ids: Int[torch.Tensor, "pos"]
    clean_logits: Float[torch.Tensor, "vocab"]
    intervened_logits: Float[torch.Tensor, "vocab"]
    clean_continuation: list[int] = field(default_factory=list)
    intervened_continuation: list[int] = field(default_factory=list)
    readouts: dict[str, SupernodeReadout] = field(default_factory=dict)
    mlp_inputs: list[torch.Tensor] = field(default_factory=list)

    def __repr__(self) -> str:
        clean, after = self.top_tokens("clean", 1)[0], self.top_tokens("intervened", 1)[0]
        return (f"InterventionResult(top clean: id {clean[0]} p={clean[1]:.3f}, top intervened: id {after[0]} "
                f"p={after[1]:.3f}, readouts={list(self.readouts)}, generated={len(self.intervened_continuation)})")

    def top_tokens(self, which: str, k: int) -> list[tuple[int, float]]:
        """``(token_id, probability)`` of the ``k`` most likely next tokens, ``which`` = clean|intervened."""
        logits = self.clean_logits if which == "clean" else self.intervened_logits
        probs = torch.softmax(logits.float(), -1)
        values, ids = probs.topk(k)
        return [(int(i), float(v)) for i, v in zip(ids, values)]

    def logit_change(self, token_id: int) -> float:
        """Intervened minus clean logit of ``token_id``."""
        return float(self.intervened_logits[token_id] - self.clean_logits[token_id])


class _Editor:
    """The ``edit_mlp_output`` callback of one intervened forward pass (see module docstring)."""

    def __init__(self, rm: ReplacementModel, trace: Trace, interventions: list[Intervention],
                 config: InterventionConfig, readouts: dict[str, list[FeatureTarget]], first_pass: bool):
        self.rm, self.trace, self.config = rm, trace, config
        self.n_prompt = trace.n_pos
        self.first_pass = first_pass
        self.features: dict[int, list[tuple[FeatureTarget, Intervention]]] = defaultdict(list)
        self.errors: dict[int, list[tuple[ErrorTarget, Intervention]]] = defaultdict(list)
        for intervention in interventions:
            for member in intervention.members():
                store = self.features if isinstance(member, FeatureTarget) else self.errors
                store[member.layer].append((member, intervention))
        self.readouts = readouts
        self.readout_layers = {m.layer for members in readouts.values() for m in members}
        self.pending: dict[int, torch.Tensor] = {}
        self.activations: dict[int, torch.Tensor] = {}  # layer -> [pos, d_transcoder] after edits
        self.inputs: dict[int, torch.Tensor] = {}  # layer -> [pos, d_model] live MLP input
        self.live: dict[int, torch.Tensor] = {}  # layer -> [pos, d_transcoder] live activations before edits
        self.cross_layer = len(rm.transcoders.output_layers(0)) > 1

    def _positions(self, positions: tuple[int, ...] | None, n: int, device: torch.device) -> torch.Tensor:
        if positions is None:
            end = n if self.config.open_ended else min(n, self.n_prompt)
            return torch.arange(self.trace.first_pos, end, device=device)
        return torch.tensor([p for p in positions if p < n], dtype=torch.long, device=device)

    def constrained(self, layer: int) -> bool:
        layers = self.config.constrained_layers
        return self.first_pass and layers is not None and layer in layers

    def __call__(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tcs, run = self.rm.transcoders, self.trace.run
        n = y.shape[1]
        x32 = self.inputs[layer] = x[0].float()
        constrained = self.constrained(layer)
        if constrained:
            out = run.mlp_outputs[layer].float().clone()
            skip_live, skip_clean = tcs.skip(layer, x32), tcs.skip(layer, run.mlp_inputs[layer].float())
            if skip_live is not None:  # live at every position, BOS included, as in attribution
                out += skip_live - skip_clean
        else:
            out = y[0].float().clone()
        needs_acts = layer in self.features or layer in self.errors or layer in self.readout_layers
        # a CLT's reconstruction at a later error layer reads this layer's live features too
        feeds_errors = self.cross_layer and self.errors and layer <= max(self.errors)
        if needs_acts or feeds_errors:
            live = self.live[layer] = tcs.encode(layer, x32)
            live[: self.trace.first_pos] = 0
        acts = None
        if needs_acts:
            reference = self.trace.activations[layer] if constrained else live
            acts = live.clone()
            for target, intervention in self.features.get(layer, []):
                pos = self._positions(target.positions, n, y.device)
                old = reference[pos, target.feature]
                new = intervention.apply(old)
                acts[pos, target.feature] = new
                decoder = tcs.decoder_vectors(layer, torch.tensor([target.feature]))[0]  # [n_out, d]
                for j, out_layer in enumerate(tcs.output_layers(layer)):
                    pending = self.pending.setdefault(out_layer, torch.zeros_like(out))
                    pending.index_add_(0, pos, (new - old)[:, None] * decoder[j])
            for target, intervention in self.errors.get(layer, []):
                pos = self._positions(target.positions, n, y.device)
                if constrained:
                    error = self.trace.errors[layer][pos]
                else:  # the live reconstruction: this layer's live features (and a CLT's earlier ones)
                    earlier = [self.live[l] if self.cross_layer else torch.zeros(n, tcs.d_transcoder(l), device=y.device)
                               for l in range(layer)]
                    error = y[0].float()[pos] - self.rm.decode_upto(layer, earlier + [live], x32)[pos]
                out.index_add_(0, pos, intervention.apply(error) - error)
            self.activations[layer] = acts
        if layer in self.pending:
            out = out + self.pending.pop(layer)
        return out[None].to(y.dtype)


class BatchEditor:
    """One :class:`_Editor` per row of a batch of sequences of equal length (each keeps its own
    pending deltas), so sampling many continuations under interventions runs the model batched.
    Rows are independent: row ``b`` of a batched pass equals the same sequence run alone (tested)."""

    def __init__(self, make_editor, batch: int):
        self.editors = [make_editor() for _ in range(batch)]

    def __call__(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x, y: (batch, pos, d_model) -> rows edited one by one, (batch, pos, d_model)
        return torch.cat([e(layer, x[b : b + 1], y[b : b + 1]) for b, e in enumerate(self.editors)])


def sample_with_interventions(
    rm: ReplacementModel, input_ids: Int[torch.Tensor, "pos"], interventions: list[Intervention],
    config: InterventionConfig, n_samples: int, n_tokens: int, batch_size: int, generator: torch.Generator,
) -> list[list[int]]:
    """``n_samples`` continuations of ``n_tokens`` sampled at ``config.temperature`` (> 0) under
    ``interventions``, as ``run_interventions`` generates one: the first token from the intervened
    prompt pass (attention frozen if ``config.freeze_attention``), every later one from a full
    forward pass with live attention and fresh editors, ``batch_size`` sequences at a time (no
    key-value cache: each step recomputes the sequence). Continuations stop at the end-of-sequence token.

    Raises:
        BadInputError: a target out of range (see :func:`run_interventions`).
    """
    first = run_interventions(rm, input_ids, interventions, InterventionConfig(
        freeze_attention=config.freeze_attention, constrained_layers=config.constrained_layers, top_k=1))
    trace = rm.trace(input_ids)
    eos = rm.model.tokenizer.eos_token_id
    first_probs = torch.softmax(first.intervened_logits.float().cpu() / config.temperature, -1)  # CPU generator
    samples: list[list[int]] = []
    for start in range(0, n_samples, batch_size):
        count = min(batch_size, n_samples - start)
        tokens = torch.multinomial(first_probs, count, replacement=True, generator=generator)[:, None]  # (count, 1)
        for _ in range(n_tokens - 1):
            ids = torch.cat([input_ids[None].expand(count, -1), tokens], dim=1)  # (count, pos + generated)
            editor = BatchEditor(lambda: _Editor(rm, trace, interventions, config, {}, first_pass=False), count)
            final = rm.model.edited_forward(ids, editor)
            probs = torch.softmax(rm.model.output_logits(final[:, -1]).float().cpu() / config.temperature, -1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
        for row in tokens.tolist():
            samples.append(row[: row.index(eos)] if eos in row else row)
    return samples


def _check_targets(rm: ReplacementModel, trace: Trace, interventions: list[Intervention],
                   readouts: dict[str, list[FeatureTarget]]) -> None:
    n_layers = rm.model.n_layers
    members = [m for i in interventions for m in i.members()] + [m for ms in readouts.values() for m in ms]
    for m in members:
        if not 0 <= m.layer < n_layers:
            raise BadInputError(f"layer {m.layer} of {m.label!r} is out of range; the model has layers 0..{n_layers - 1}")
        d_transcoder = rm.transcoders.d_transcoder(m.layer)
        if isinstance(m, FeatureTarget) and not 0 <= m.feature < d_transcoder:
            raise BadInputError(f"feature {m.feature} of {m.label!r} is out of range 0..{d_transcoder - 1}")
        for p in m.positions or ():
            if not trace.first_pos <= p < trace.n_pos:
                raise BadInputError(
                    f"position {p} of {m.label!r} is outside the prompt's node positions "
                    f"{trace.first_pos}..{trace.n_pos - 1}"
                )


@torch.no_grad()
def run_interventions(
    rm: ReplacementModel,
    input_ids: Int[torch.Tensor, "pos"],
    interventions: list[Intervention],
    config: InterventionConfig = InterventionConfig(),
    readouts: dict[str, list[FeatureTarget]] | None = None,
    trace: Trace | None = None,
) -> InterventionResult:
    """Run the prompt clean and with ``interventions``; generate and read out.

    Args:
        rm: model and transcoders.
        input_ids: ``[pos]`` the prompt.
        interventions: applied together in one pass.
        config: modes and generation settings.
        readouts: supernode label -> its feature members (each with explicit positions), whose
            activations are read on the prompt pass, clean and intervened.
        trace: the prompt's clean run, ``rm.trace(input_ids)``, when the caller already has it (many
            interventions on one prompt need it once); it is not changed.

    Raises:
        BadInputError: a layer, feature or position out of range, a bad layer range, or a trace of
            another prompt.
    """
    readouts = readouts or {}
    layers = config.constrained_layers
    if layers is not None and (len(layers) == 0 or layers.start < 0 or layers.stop > rm.model.n_layers):
        raise BadInputError(
            f"constrained layers {layers.start}:{layers.stop} must be a non-empty range within 0:{rm.model.n_layers}"
        )
    if trace is None:
        trace = rm.trace(input_ids)
    elif not torch.equal(trace.run.input_ids.cpu(), input_ids.cpu()):
        raise BadInputError(f"the trace given is of another prompt ({len(trace.run.input_ids)} tokens) than "
                            f"input_ids ({len(input_ids)} tokens); pass rm.trace(input_ids)")
    _check_targets(rm, trace, interventions, readouts)
    run = trace.run
    all_layers = layers is not None and set(range(rm.model.n_layers)) <= set(layers)
    patterns = run.frozen.patterns if config.freeze_attention else None
    norm_scales = run.frozen.norm_scales if all_layers else None

    editor = _Editor(rm, trace, interventions, config, readouts, first_pass=True)
    final = rm.model.edited_forward(input_ids[None], editor, patterns, norm_scales)
    result = InterventionResult(input_ids, run.logits.float(), rm.model.output_logits(final[0, -1]).float(),
                                mlp_inputs=[editor.inputs[layer] for layer in range(rm.model.n_layers)])
    for label, members in readouts.items():
        keys = [(m.layer, m.feature, p) for m in members for p in (m.positions or ())]
        clean = torch.stack([trace.activations[lay][p, f] for lay, f, p in keys]) if keys else torch.zeros(0)
        new = torch.stack([editor.activations[lay][p, f] for lay, f, p in keys]) if keys else torch.zeros(0)
        result.readouts[label] = SupernodeReadout(keys, clean, new)

    if config.generate:
        generator = torch.Generator().manual_seed(config.seed)
        result.clean_continuation = _generate(rm, input_ids, run.logits, config, generator, editor=None)
        generator = torch.Generator().manual_seed(config.seed)
        result.intervened_continuation = _generate(
            rm, input_ids, result.intervened_logits, config, generator,
            editor=lambda: _Editor(rm, trace, interventions, config, {}, first_pass=False),
        )
    return result


def _next_token(logits: torch.Tensor, config: InterventionConfig, generator: torch.Generator) -> int:
    if config.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / config.temperature, -1)  # the generator is a CPU one
    return int(torch.multinomial(probs, 1, generator=generator))


def _generate(rm, input_ids, first_logits, config, generator, editor) -> list[int]:
    """``config.generate`` tokens; the first comes from ``first_logits`` (the prompt pass), the
    rest from full forward passes with live attention (and fresh editors, if intervening)."""
    ids = input_ids.clone()
    tokens = [_next_token(first_logits, config, generator)]
    while len(tokens) < config.generate:
        ids = torch.cat([input_ids, torch.tensor(tokens)])
        if editor is None:
            final = rm.model.edited_forward(ids[None], lambda layer, x, y: y)
        else:
            final = rm.model.edited_forward(ids[None], editor())
        tokens.append(_next_token(rm.model.output_logits(final[0, -1]), config, generator))
    return tokens
