"""Feature cards: what the explorer shows about one transcoder feature, read from the feature store.

A graph names its transcoder set in ``metadata.scan``; its store is the one ``mechscope features
build`` writes for that set (``$MECHSCOPE_HOME/features/<set>.sqlite``) unless ``mechscope serve
--store`` names one. Without a store the card says how to build one (the graph's own label,
activation and density still show).
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

from mechscope.errors import BadInputError, CorruptFileError
from mechscope.features.store import FeatureStore
from mechscope.paths import cache_root

__all__ = ["FeatureCards", "NoStoreError", "FeatureNotFoundError", "card_json"]

#: how many top-activation examples a card carries
N_EXAMPLES = 8
_SCAN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class NoStoreError(BadInputError):
    """No feature store exists for the graph's transcoder set. Answered with HTTP 200 and
    ``"no_store": true`` — a normal state, not a failed request (a 404 would be logged as an error in
    the browser's console on every card); the card shows how to build one."""

    http_status = 200


class FeatureNotFoundError(BadInputError):
    """The store has no such feature (HTTP 404)."""

    http_status = 404


class FeatureCards:
    """Feature cards from the store of each transcoder set.

    Args:
        store: one store used for every graph (``mechscope serve --store``); None looks up
            ``$MECHSCOPE_HOME/features/<scan>.sqlite`` for each graph's ``scan``.
    """

    def __init__(self, store: str | os.PathLike | None = None):
        self.store = Path(store) if store is not None else None

    def store_path(self, scan: str) -> Path:
        """The store file for transcoder set ``scan`` (a set name or a path whose last part is one).

        Raises:
            BadInputError: ``scan`` is not a plain set name.
            NoStoreError: the store does not exist.
        """
        name = Path(scan).name
        if not _SCAN.fullmatch(name):
            raise BadInputError(f"transcoder set name {scan!r} is not a plain name (letters, digits, '.', '_', '-')")
        path = self.store or cache_root() / "features" / f"{name}.sqlite"
        if not path.is_file():
            raise NoStoreError(f"no feature store for transcoders {name!r} at {str(path)!r}; build one with "
                               f"`mechscope features build --transcoders {name}` to see examples and logits here")
        return path

    def card(self, scan: str, layer: int, feature: int) -> dict:
        """The card of feature ``layer/feature`` of set ``scan`` as JSON-ready data (see :func:`card_json`).

        Raises:
            NoStoreError: no store for ``scan``.
            FeatureNotFoundError: the feature is not in the store.
            BadInputError: ``scan`` is not a plain name, or the store belongs to another set.
            CorruptFileError: the store is not a readable feature store (a missing table, say).
        """
        store = FeatureStore(self.store_path(scan))
        try:
            built_for = Path(str(store.meta.get("transcoders", ""))).name
            if self.store is not None and built_for != Path(scan).name:
                raise BadInputError(f"feature store {str(store.path)!r} was built for transcoders {built_for!r}, "
                                    f"not the graph's {Path(scan).name!r}")
            try:
                return card_json(store, layer, feature)
            except BadInputError as e:
                raise FeatureNotFoundError(str(e)) from e
            except sqlite3.Error as e:
                raise CorruptFileError(f"feature store {str(store.path)!r} cannot be read: {e}; rebuild it with "
                                       "`mechscope features build`") from e
        finally:
            store.con.close()


def card_json(store: FeatureStore, layer: int, feature: int) -> dict:
    """``{layer, feature, label, density, active, max_value, hist, hist_edges, top_logits,
    bottom_logits, examples}``; ``examples`` are the top contexts, each ``{tokens, acts, center,
    value}`` (activations per token of the window; ``center`` the index of the maximum).

    Raises:
        BadInputError: the feature is not in the store.
    """
    dash = store.feature(layer, feature)
    return {
        "layer": layer, "feature": feature, "label": dash.label, "density": dash.density, "active": dash.active,
        "max_value": dash.max_value, "hist": dash.hist, "hist_edges": dash.hist_edges,
        "top_logits": [list(t) for t in dash.pos_tokens], "bottom_logits": [list(t) for t in dash.neg_tokens],
        "examples": [{"tokens": e.tokens, "acts": e.acts, "center": e.center, "value": e.value}
                     for e in dash.top[:N_EXAMPLES]],
    }
