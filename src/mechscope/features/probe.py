"""Probe a feature on new prompts, relative to its dashboard maximum.

The circuits update's check of a dashboard: run novel prompts and report the feature's maximum
activation on each as a percentage of the largest activation the dashboard corpus produced
(values above 100 % mean the dashboard's data missed where the feature fires hardest).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from mechscope.errors import BadInputError
from mechscope.replacement.replacement_model import ReplacementModel

__all__ = ["ProbeResult", "probe_feature"]


@dataclass
class ProbeResult:
    """One prompt's maximum activation (``position`` / ``token`` where it occurs; BOS excluded).

    When the feature does not fire on the prompt (``active`` false), ``max_activation`` and
    ``percent_of_max`` are 0 and ``position`` / ``token`` name where it came closest: the largest
    pre-activation, ``pre_activation``.
    """

    prompt: str
    max_activation: float
    percent_of_max: float
    token: str
    position: int
    active: bool = True
    pre_activation: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def probe_feature(rm: ReplacementModel, layer: int, feature: int, prompts: list[str],
                  dashboard_max: float) -> list[ProbeResult]:
    """Maximum activation of feature ``layer/feature`` on each prompt.

    Raises:
        BadInputError: layer or feature out of range, an empty prompt, or a non-positive maximum.
    """
    if not 0 <= layer < rm.model.n_layers:
        raise BadInputError(f"layer {layer} is out of range 0..{rm.model.n_layers - 1}")
    if not 0 <= feature < rm.transcoders.d_transcoder(layer):
        raise BadInputError(f"feature {feature} is out of range 0..{rm.transcoders.d_transcoder(layer) - 1}")
    if dashboard_max <= 0:
        raise BadInputError(f"feature {layer}/{feature} never fired on the dashboard corpus (max {dashboard_max})")
    results = []
    for prompt in prompts:
        ids = rm.tokenize(prompt)
        first = 1 if rm.model.has_bos(ids) else 0
        inputs, _ = rm.model.run_with_mlp_sites(ids[None], layers=[layer])
        x = inputs[0][0].float()
        acts = rm.transcoders.encode(layer, x)[:, feature]
        pre = rm.transcoders.pre_activations(layer, x)[:, feature]
        active = bool((acts[first:] > 0).any())
        # BOS excluded; a feature that does not fire is placed where its pre-activation is largest
        position = first + int((acts if active else pre)[first:].argmax())
        value = float(acts[position]) if active else 0.0
        results.append(ProbeResult(prompt, value, 100.0 * value / dashboard_max,
                                   rm.model.tokenizer.decode([int(ids[position])]), position, active,
                                   float(pre[position])))
    return results
