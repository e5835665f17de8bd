"""The feature store: per-feature dashboards in one SQLite file, readable without torch.

Tables (SQLite, written once to a temporary file and renamed into place):

- ``meta(key, value)``: JSON values — ``model``, ``transcoders``, ``n_tokens``, ``hist_edges``,
  ``window``, ``corpus``;
- ``features(layer, feature, active, density, max_value, hist, pos_tokens, neg_tokens, label)``:
  ``hist`` is little-endian int64 counts per histogram bin; ``pos_tokens`` / ``neg_tokens`` are JSON
  ``[[token, logit_effect], ...]`` (top and bottom direct logit effects);
- ``examples(layer, feature, kind, interval, rank, sequence, start, position, value, acts)``:
  ``kind`` is ``top`` (the top contexts, ``interval`` -1) or ``quantile`` (sampled uniformly among
  tokens whose activation lies in ``(interval/Q, (interval+1)/Q] x max``, Neuronpedia's
  ``examples_quantiles``); ``position`` is the example's token in its sequence (the maximum for
  ``top``) and ``value`` its activation; ``acts`` little-endian float16 activations of the window
  starting at ``start``;
- ``sequences(sequence, tokens)``: JSON list of the token strings of each referenced sequence.

``meta.format`` is :data:`FORMAT`; a store of another format must be rebuilt. This module imports
only the standard library and numpy.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mechscope.node_ids import parse_feature_ref
from mechscope.errors import BadInputError, CorruptFileError

__all__ = ["FeatureStore", "FeatureDashboard", "Example", "QuantileInterval", "write_store", "parse_feature_id",
           "FORMAT"]

#: store layout version, bumped whenever a table changes
FORMAT = 2

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE features (layer INTEGER, feature INTEGER, active INTEGER, density REAL, max_value REAL,
                       hist BLOB, pos_tokens TEXT, neg_tokens TEXT, label TEXT DEFAULT '',
                       PRIMARY KEY (layer, feature));
CREATE TABLE examples (layer INTEGER, feature INTEGER, kind TEXT, interval INTEGER, rank INTEGER,
                       sequence INTEGER, start INTEGER, position INTEGER, value REAL, acts BLOB);
CREATE INDEX examples_feature ON examples (layer, feature);
CREATE TABLE sequences (sequence INTEGER PRIMARY KEY, tokens TEXT);
"""


def parse_feature_id(text: str) -> tuple[int, int]:
    """``(layer, index)`` of a feature named in any form of :data:`mechscope.node_ids.FEATURE_FORMS`
    (``16/759``, ``16/759@8``, ``16_759_8``); a position, if given, is ignored.

    Raises:
        BadInputError: the text names no feature.
    """
    ref = parse_feature_ref(text)
    return ref.layer, ref.feature


@dataclass
class Example:
    """A context: ``tokens`` of the window (from position ``start`` of corpus sequence ``sequence``)
    and the feature's activation on each; ``position`` is the example's token (the maximum, for top
    examples) and ``value`` its activation."""

    sequence: int
    start: int
    position: int
    value: float
    tokens: list[str]
    acts: list[float]

    @property
    def center(self) -> int:
        """Index of the example's token within the window."""
        return self.position - self.start


@dataclass
class QuantileInterval:
    """Examples sampled uniformly among tokens whose activation lies in ``(low, high]``."""

    index: int
    low: float
    high: float
    examples: list[Example]


@dataclass
class FeatureDashboard:
    """Everything the store holds about one feature."""

    layer: int
    feature: int
    active: int
    density: float
    max_value: float
    hist: list[int]
    hist_edges: list[float]
    pos_tokens: list[tuple[str, float]]
    neg_tokens: list[tuple[str, float]]
    label: str
    top: list[Example] = field(default_factory=list)
    quantiles: list[QuantileInterval] = field(default_factory=list)


def write_store(path: str | os.PathLike, meta: dict, features: dict[str, np.ndarray],
                examples: dict[str, np.ndarray], sequences: dict[int, list[str]],
                logit_tokens: dict[str, list]) -> Path:
    """Write a store atomically.

    Args:
        meta: JSON-serialisable metadata (``hist_edges``, ``window``, ``n_tokens``, ``n_intervals``, ...);
            ``format`` is added.
        features: ``layer, feature, active, density, max_value`` ``[n]`` arrays and ``hist`` ``[n, bins]``.
        examples: ``layer, feature, kind, interval, rank, sequence, start, position, value`` ``[m]`` and
            ``acts`` ``[m, window]``.
        sequences: token strings of every referenced sequence.
        logit_tokens: ``pos`` / ``neg``: per feature row a list of ``[token, value]``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        con = sqlite3.connect(tmp)
        con.executescript(SCHEMA)
        con.executemany("INSERT INTO meta VALUES (?, ?)",
                        [(k, json.dumps(v)) for k, v in (meta | {"format": FORMAT}).items()])
        hist = features["hist"].astype("<i8")
        con.executemany(
            "INSERT INTO features (layer, feature, active, density, max_value, hist, pos_tokens, neg_tokens) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ((int(features["layer"][i]), int(features["feature"][i]), int(features["active"][i]),
              float(features["density"][i]), float(features["max_value"][i]), hist[i].tobytes(),
              json.dumps(logit_tokens["pos"][i]), json.dumps(logit_tokens["neg"][i]))
             for i in range(len(features["layer"]))),
        )
        acts = examples["acts"].astype("<f2")
        columns = ("layer", "feature", "kind", "interval", "rank", "sequence", "start", "position", "value")
        con.executemany(
            "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((*(examples[c][i].item() if hasattr(examples[c][i], "item") else examples[c][i] for c in columns),
              acts[i].tobytes()) for i in range(len(examples["layer"]))),
        )
        con.executemany("INSERT INTO sequences VALUES (?, ?)",
                        ((int(s), json.dumps(tokens)) for s, tokens in sequences.items()))
        con.commit()
        con.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class FeatureStore:
    """Read a store written by :func:`write_store` (labels are the only thing it writes).

    Raises:
        BadInputError: the file does not exist.
        CorruptFileError: it is not a feature store.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInputError(f"no feature store at {str(self.path)!r}; build one with `mechscope features build`")
        try:
            self.con = sqlite3.connect(self.path)
            self.meta = {k: json.loads(v) for k, v in self.con.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise CorruptFileError(f"{self.path} is not a mechscope feature store: {e}") from e
        if self.meta.get("format", 1) != FORMAT:
            raise CorruptFileError(f"{self.path} is a feature store of format {self.meta.get('format', 1)}; this "
                                   f"mechscope reads format {FORMAT}: rebuild it with `mechscope features build`")

    def feature(self, layer: int, feature: int) -> FeatureDashboard:
        """The dashboard of one feature.

        Raises:
            BadInputError: no such feature in the store (names the valid ranges).
        """
        row = self.con.execute(
            "SELECT active, density, max_value, hist, pos_tokens, neg_tokens, label FROM features "
            "WHERE layer = ? AND feature = ?", (layer, feature)).fetchone()
        if row is None:
            n_layers, n_features = self.con.execute("SELECT MAX(layer) + 1, MAX(feature) + 1 FROM features").fetchone()
            raise BadInputError(f"feature {layer}/{feature} is not in the store; layers 0..{n_layers - 1}, "
                                f"features 0..{n_features - 1}")
        active, density, max_value, hist, pos, neg, label = row
        dashboard = FeatureDashboard(layer, feature, active, density, max_value,
                                     np.frombuffer(hist, "<i8").tolist(), self.meta["hist_edges"],
                                     [tuple(t) for t in json.loads(pos)], [tuple(t) for t in json.loads(neg)], label)
        rows = self.con.execute(
            "SELECT e.kind, e.interval, e.sequence, e.start, e.position, e.value, e.acts, s.tokens FROM examples e "
            "JOIN sequences s ON e.sequence = s.sequence WHERE e.layer = ? AND e.feature = ? "
            "ORDER BY e.kind DESC, e.interval DESC, e.rank", (layer, feature))
        n_intervals = self.meta.get("n_intervals", 0)
        intervals = [QuantileInterval(q, max_value * q / n_intervals, max_value * (q + 1) / n_intervals, [])
                     for q in reversed(range(n_intervals))]
        for kind, interval, sequence, start, position, value, acts, tokens in rows:
            window = np.frombuffer(acts, "<f2").astype(float).tolist()
            example = Example(sequence, start, position, value, json.loads(tokens)[start:start + len(window)], window)
            if kind == "top":
                dashboard.top.append(example)
            else:
                intervals[n_intervals - 1 - interval].examples.append(example)
        dashboard.quantiles = [q for q in intervals if q.examples]
        return dashboard

    def active_features(self) -> list[tuple[int, int, float]]:
        """``(layer, feature, density)`` of every feature that fired on the corpus."""
        return list(self.con.execute("SELECT layer, feature, density FROM features WHERE active > 0 "
                                     "ORDER BY layer, feature"))

    def densest(self, n: int = 10) -> list[tuple[int, int, float]]:
        """``(layer, feature, density)`` of the ``n`` most frequently active features."""
        return list(self.con.execute("SELECT layer, feature, density FROM features ORDER BY density DESC LIMIT ?", (n,)))

    def densities(self) -> np.ndarray:
        """``[n_features_total]`` density of every feature in the store (layer-major)."""
        return np.array([d for (d,) in self.con.execute("SELECT density FROM features ORDER BY layer, feature")])

    def density_table(self) -> np.ndarray:
        """``[n_layers, d_transcoder]`` density of every feature."""
        n_layers = self.con.execute("SELECT MAX(layer) + 1 FROM features").fetchone()[0]
        return self.densities().reshape(n_layers, -1)

    def set_label(self, layer: int, feature: int, label: str) -> None:
        """Store a human label for a feature (used as ``clerp`` in graph exports)."""
        self.feature(layer, feature)  # raises for an unknown feature
        self.con.execute("UPDATE features SET label = ? WHERE layer = ? AND feature = ?", (label, layer, feature))
        self.con.commit()

    def labels(self) -> dict[str, str]:
        """Non-empty labels keyed ``"layer/feature"``."""
        return {f"{lay}/{f}": text for lay, f, text in
                self.con.execute("SELECT layer, feature, label FROM features WHERE label != ''")}
