"""Identifiers shared by graph exports and feature files (torch-free)."""

from __future__ import annotations

__all__ = ["cantor_pair"]


def cantor_pair(x: int, y: int) -> int:
    """Cantor pairing ``(x + y)(x + y + 1)/2 + y``: Neuronpedia's ``feature`` of a transcoder node
    ``(layer, feature)``, also the file name of its feature JSON."""
    return (x + y) * (x + y + 1) // 2 + y
