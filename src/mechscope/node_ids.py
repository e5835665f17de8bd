"""Identifiers shared by graph exports, feature files and every command that names a feature (torch-free).

**One notation for a feature.** Every command that names a feature accepts each of these forms,
and every command prints forms the others accept:

| form | example | means |
|---|---|---|
| ``LAYER/FEATURE`` | ``16/759`` | feature 759 of the transcoder reading layer 16 (every position) |
| ``LAYER/FEATURE@POS`` | ``16/759@8``, ``16/759@2,5``, ``16/759@all`` | the same at token positions |
| graph node id ``LAYER_FEATURE_POS`` | ``16_759_8`` | the feature node at position 8 (Neuronpedia's id) |
| ``LAYER:FEATURE@POS`` | ``16:759@8`` | the older ``--inject`` spelling |

Commands about a feature itself (``features show``, ``probe``, ``dream``) ignore the position;
``intervene`` uses it (no position: every position).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mechscope.errors import BadInputError

__all__ = ["cantor_pair", "FeatureRef", "parse_feature_ref", "FEATURE_FORMS"]

FEATURE_FORMS = "LAYER/FEATURE (16/759), LAYER/FEATURE@POS (16/759@8, @2,5 or @all) or a node id LAYER_FEATURE_POS (16_759_8)"

_SLASH = re.compile(r"^(\d+)[/:](\d+)(?:@([\d,]+|all|\*))?$")
_NODE_ID = re.compile(r"^(\d+)_(\d+)_(\d+)$")


def cantor_pair(x: int, y: int) -> int:
    """Cantor pairing ``(x + y)(x + y + 1)/2 + y``: Neuronpedia's ``feature`` of a transcoder node
    ``(layer, feature)``, also the file name of its feature JSON."""
    return (x + y) * (x + y + 1) // 2 + y


@dataclass(frozen=True)
class FeatureRef:
    """A feature named by a user: ``layer``, ``feature`` index, and ``positions`` (``None``: not
    given or ``all``)."""

    layer: int
    feature: int
    positions: tuple[int, ...] | None = None

    def __str__(self) -> str:
        if self.positions is None:
            return f"{self.layer}/{self.feature}"
        return f"{self.layer}/{self.feature}@{','.join(map(str, self.positions))}"

    def node_id(self, pos: int) -> str:
        return f"{self.layer}_{self.feature}_{pos}"


def parse_feature_ref(text: str) -> FeatureRef:
    """Parse any form of :data:`FEATURE_FORMS`.

    Raises:
        BadInputError: the text is none of the forms (the message lists them).
    """
    text = text.strip()
    match = _SLASH.match(text)
    if match:
        positions = match[3]
        parsed = None if positions in (None, "all", "*") else tuple(int(p) for p in positions.split(",") if p)
        if parsed == ():
            raise BadInputError(f"feature {text!r}: no position after '@'; give e.g. @8, @2,5 or @all")
        return FeatureRef(int(match[1]), int(match[2]), parsed)
    match = _NODE_ID.match(text)
    if match:
        return FeatureRef(int(match[1]), int(match[2]), (int(match[3]),))
    where = re.match(r"^\d+[/:]\d+@(.*)$", text)
    if where:
        raise BadInputError(f"feature {text!r}: positions {where[1]!r} must be integers (comma-separated) or 'all'")
    raise BadInputError(f"feature {text!r} is not a feature id; write {FEATURE_FORMS}")
