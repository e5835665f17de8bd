"""Interventions as typed records: what to change (a target) and how (an operation).

Targets follow the attribution graph's node kinds (Ameisen et al. 2025, "Circuit Tracing",
section "Intervention experiments"; Lindsey et al. 2025, "On the Biology of a Large Language
Model", where supernodes are suppressed by -10x and features injected):

- :class:`FeatureTarget` a transcoder feature ``(layer, feature)`` at some or all positions;
- :class:`ErrorTarget` the MLP reconstruction error of one layer at some positions;
- :class:`SupernodeTarget` a labelled group of feature and error nodes, changed together.

Operations act on a feature's activation ``a`` (or an error vector ``e``):

| operation | feature              | error        |
|-----------|----------------------|--------------|
| ``scale`` | ``a -> value * a``   | ``e -> value * e`` |
| ``set``   | ``a -> value``       | not defined  |
| ``add``   | ``a -> a + value`` (inject an inactive feature) | not defined |
| ``zero``  | ``a -> 0``           | ``e -> 0``   |

Node ids are the Neuronpedia ones of DESIGN.md: feature ``{layer}_{feature}_{pos}``, error
``{layer}_-1_{pos}``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from mechscope.errors import BadInputError

__all__ = [
    "OPERATIONS",
    "FeatureTarget",
    "ErrorTarget",
    "SupernodeTarget",
    "Intervention",
    "target_from_node_id",
]

OPERATIONS = ("scale", "set", "add", "zero")
_NODE_ID = re.compile(r"^(\d+)_(-1|\d+)_(\d+)$")


@dataclass(frozen=True)
class FeatureTarget:
    """Feature ``feature`` of the transcoder reading layer ``layer``'s MLP input.

    Attributes:
        positions: token positions, or ``None`` for every position that has feature nodes
            (and, in open-ended generation, every generated position).
    """

    layer: int
    feature: int
    positions: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        where = "all" if self.positions is None else ",".join(map(str, self.positions))
        return f"{self.layer}/{self.feature}@{where}"


@dataclass(frozen=True)
class ErrorTarget:
    """The MLP reconstruction error ``y - y_hat`` of layer ``layer`` at ``positions``."""

    layer: int
    positions: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"error {self.layer}@{','.join(map(str, self.positions))}"


@dataclass(frozen=True)
class SupernodeTarget:
    """A labelled group of feature and error nodes (a graph's ``qParams.supernodes`` entry)."""

    label: str
    members: tuple[FeatureTarget | ErrorTarget, ...]


Target = FeatureTarget | ErrorTarget | SupernodeTarget


def target_from_node_id(node_id: str) -> FeatureTarget | ErrorTarget:
    """The target a graph node id names: ``L_F_P`` -> feature, ``L_-1_P`` -> error.

    Raises:
        BadInputError: for embedding (``E_...``) or logit nodes, or a malformed id.
    """
    match = _NODE_ID.match(node_id)
    if node_id.startswith("E_"):
        raise BadInputError(f"node {node_id!r} is a token embedding; only feature and error nodes can be intervened on")
    if not match:
        raise BadInputError(
            f"malformed node id {node_id!r}; expected a feature '{{layer}}_{{feature}}_{{pos}}' "
            "or an error '{layer}_-1_{pos}'"
        )
    layer, feature, pos = int(match[1]), int(match[2]), int(match[3])
    if feature < 0:
        return ErrorTarget(layer, (pos,))
    return FeatureTarget(layer, feature, (pos,))


@dataclass(frozen=True)
class Intervention:
    """Apply ``operation`` with ``value`` to ``target``.

    Raises:
        BadInputError: unknown operation, non-finite value, or ``set`` / ``add`` on an error node.
    """

    target: Target
    operation: str
    value: float = 0.0

    def __post_init__(self):
        if self.operation not in OPERATIONS:
            raise BadInputError(f"unknown intervention operation {self.operation!r}; choose one of {', '.join(OPERATIONS)}")
        if not math.isfinite(self.value):
            raise BadInputError(f"intervention value must be a finite number, got {self.value!r}")
        members = self.target.members if isinstance(self.target, SupernodeTarget) else (self.target,)
        if self.operation in ("set", "add") and any(isinstance(m, ErrorTarget) for m in members):
            raise BadInputError(
                f"{self.operation!r} is not defined for error nodes (target {self.describe()!r}); use scale or zero"
            )

    def members(self) -> tuple[FeatureTarget | ErrorTarget, ...]:
        """The feature and error targets this intervention changes."""
        return self.target.members if isinstance(self.target, SupernodeTarget) else (self.target,)

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        """New activation (or error scale factor input) after the operation, same shape."""
        if self.operation == "scale":
            return activation * self.value
        if self.operation == "set":
            return torch.full_like(activation, self.value)
        if self.operation == "add":
            return activation + self.value
        return torch.zeros_like(activation)

    def describe(self) -> str:
        name = self.target.label
        return {"scale": f"scale {name} x{self.value:g}", "set": f"set {name} = {self.value:g}",
                "add": f"add {self.value:g} to {name}", "zero": f"zero {name}"}[self.operation]

    def as_dict(self) -> dict:
        """JSON-ready echo (the CLI's ``interventions`` key)."""
        members = [
            {"kind": "feature", "layer": m.layer, "feature": m.feature,
             "positions": None if m.positions is None else list(m.positions)}
            if isinstance(m, FeatureTarget) else {"kind": "error", "layer": m.layer, "positions": list(m.positions)}
            for m in self.members()
        ]
        return {"target": self.target.label, "operation": self.operation, "value": self.value, "members": members}
