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
    """One prompt's maximum activation (``position`` / ``token`` where it occurs; BOS excluded)."""

    prompt: str
    max_activation: float
    percent_of_max: float
    token: str
    position: int

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
        acts = rm.transcoders.encode(layer, inputs[0][0].float())[:, feature]
        position = first + int(acts[first:].argmax())  # BOS excluded, also when the feature never fires
        value = float(acts[position])
        results.append(ProbeResult(prompt, value, 100.0 * value / dashboard_max,
                                   rm.model.tokenizer.decode([int(ids[position])]), position))
    return results
