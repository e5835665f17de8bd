"""Build an offline training corpus and stream it as fixed-length token sequences.

``build_corpus`` gathers documents from registry sources (:mod:`mechscope.data.sources`), local
``.txt`` / ``.jsonl`` files, or Hugging Face datasets (``hf:NAME[:SPLIT]``, needs the network and the
``datasets`` package), holds out every ``heldout_every``-th document, and writes one JSONL file per
source plus ``manifest.json`` under ``<cache>/corpus/<name>``. :class:`TokenStream` tokenizes each
source once per tokenizer (cached as ``.npy``) and yields ``[batch, ctx_len]`` sequences, each
starting with BOS, drawn from the sources in proportion to their weights, either as one window of
one source (``mix="source"``) or as pieces of several documents from any sources, separated by
EOS (``mix="document"``, mixed per document). The stream is a pure function of ``(seed, index)``, so
training resumes exactly from a sequence index.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mechscope.data.sources import SOURCES, iter_source
from mechscope.errors import BadInputError
from mechscope.paths import atomic_write_bytes, atomic_write_text, cache_root
from mechscope.progress import Progress

__all__ = ["CorpusConfig", "build_corpus", "TokenStream", "corpus_dir", "resolve_corpus", "MIXES"]

logger = logging.getLogger(__name__)

DEFAULT_SOURCES = ("sotu", "brown", "austen", "anarchism", "python-docs", "python-code", "email", "fortunes")

#: how a sequence is drawn: one window of one source, or pieces of documents from any sources
MIXES = ("source", "document")


def corpus_dir(name: str = "default") -> Path:
    return cache_root() / "corpus" / name


def resolve_corpus(name_or_path: str | None) -> Path:
    """A built corpus by ``--corpus`` value: ``None`` is the default corpus, an existing directory is
    itself, a bare name (no ``/``) is ``<cache>/corpus/NAME`` (e.g. ``chat-qwen2.5-coder-0.5b-instruct``)."""
    if name_or_path is None:
        return corpus_dir()
    path = Path(name_or_path)
    return corpus_dir(name_or_path) if not path.is_dir() and "/" not in name_or_path else path


@dataclass(frozen=True)
class CorpusConfig:
    """What goes into a corpus.

    Attributes:
        sources: registry source names (see ``SOURCES``), local ``.txt``/``.jsonl`` paths, or
            ``hf:DATASET[:SPLIT]``.
        weights: sampling weight per source (same order; normalised; default equal), the share of
            training sequences each source supplies, so that no single source dominates.
        heldout_every: every n-th document (n >= 2) goes to the held-out split.
        max_docs_per_source: cap per source (0 = no cap), for tests and quick runs.
    """

    sources: tuple[str, ...] = DEFAULT_SOURCES
    weights: tuple[float, ...] = ()
    heldout_every: int = 50
    max_docs_per_source: int = 0

    def __post_init__(self):
        if not self.sources:
            raise BadInputError("a corpus needs at least one source")
        if self.weights and len(self.weights) != len(self.sources):
            raise BadInputError(
                f"got {len(self.weights)} weights for {len(self.sources)} sources {list(self.sources)}"
            )
        if any(w <= 0 for w in self.weights):
            raise BadInputError(f"source weights must be positive, got {list(self.weights)}")
        if self.heldout_every < 2:
            raise BadInputError(f"heldout_every must be >= 2, got {self.heldout_every}")

    def normalized_weights(self) -> list[float]:
        w = list(self.weights) or [1.0] * len(self.sources)
        return [x / sum(w) for x in w]


def _source_key(source: str) -> str:
    if source in SOURCES:
        return source
    return Path(source.removeprefix("hf:")).name.replace(":", "_").replace(".", "_")


def _iter_documents(source: str) -> Iterator[str]:
    if source in SOURCES:
        yield from iter_source(source)
        return
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        try:
            import datasets
        except ImportError as e:
            raise BadInputError("hf: sources need the datasets package: pip install datasets") from e
        for row in datasets.load_dataset(name, split=split or "train", streaming=True):
            yield row["text"]
        return
    path = Path(source)
    if not path.exists():
        raise BadInputError(
            f"unknown corpus source {source!r}: not a registry source ({', '.join(SOURCES)}), "
            "not an existing .txt/.jsonl file, not hf:NAME"
        )
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".txt":
            yield file.read_text(encoding="utf-8", errors="replace")
        elif file.suffix == ".jsonl":
            for line in file.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    yield json.loads(line)["text"]


def build_corpus(config: CorpusConfig = CorpusConfig(), out: Path | None = None, progress=False) -> Path:
    """Gather the documents of every source into ``out`` (default ``<cache>/corpus/default``).

    ``progress``: a phase line per source (:class:`mechscope.progress.Progress` or a bool).

    Returns:
        the corpus directory, holding ``<source>.train.jsonl``, ``<source>.heldout.jsonl`` and
        ``manifest.json`` (sources, weights, document and character counts).

    Raises:
        BadInputError: unknown source, or a source that yields no text.
    """
    out = Path(out) if out is not None else corpus_dir()
    shutil.rmtree(out / "tokens", ignore_errors=True)  # token caches of a previous build are stale
    manifest = {"sources": [], "heldout_every": config.heldout_every}
    progress = Progress.of(progress)
    for n, (source, weight) in enumerate(zip(config.sources, config.normalized_weights()), start=1):
        key = _source_key(source)
        progress.phase(f"source {n}/{len(config.sources)}: {key} (fetched from its registry on first use)")
        splits: dict[str, list[str]] = {"train": [], "heldout": []}
        for i, text in enumerate(_iter_documents(source)):
            if config.max_docs_per_source and i >= config.max_docs_per_source:
                break
            text = text.strip()
            if text:
                splits["heldout" if i % config.heldout_every == config.heldout_every - 1 else "train"].append(text)
        if not splits["train"]:
            raise BadInputError(f"corpus source {source!r} yielded no documents")
        for split, docs in splits.items():
            lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
            atomic_write_text(out / f"{key}.{split}.jsonl", lines)
        chars = sum(len(d) for d in splits["train"])
        logger.info("corpus source %s: %d documents, %d characters", key, len(splits["train"]), chars)
        manifest["sources"].append(
            {"name": key, "source": source, "weight": weight, "documents": len(splits["train"]),
             "heldout_documents": len(splits["heldout"]), "characters": chars}
        )
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return out


@dataclass
class TokenStream:
    """Fixed-length token sequences drawn from a built corpus by source weight.

    Args:
        corpus: directory written by :func:`build_corpus`.
        tokenizer: a Hugging Face tokenizer (its ``bos_token_id`` starts every sequence).
        ctx_len: tokens per sequence, BOS included.
        split: ``train`` or ``heldout``.
        seed: fixes the order; sequence ``i`` is the same on every run.
        mix: ``source``: a sequence is one window of one source (picked by weight). ``document``: a
            sequence is filled with pieces of documents, each from a source picked by weight, starting
            at a random point of a random document, ``min_piece`` to ``ctx_len - 1`` tokens long and
            cut at the document's end, pieces separated by EOS — so one context can hold code after
            e-mail after prose, as in pretraining data packed per document.
        min_piece: shortest piece in ``document`` mode.
        sources: only these sources (manifest names, e.g. ``("chat",)``), weights renormalised;
            ``None``: every source. Held-out figures per kind of text use it.

    Attributes:
        manifest: the corpus' ``manifest.json`` (sources, weights, document counts).
    """

    corpus: Path
    tokenizer: object
    ctx_len: int = 128
    split: str = "train"
    seed: int = 0
    mix: str = "source"
    min_piece: int = 16
    sources: tuple[str, ...] | None = None
    _tokens: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _doc_starts: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _weights: list[float] = field(default_factory=list, init=False, repr=False)
    manifest: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.corpus = Path(self.corpus)
        manifest_file = self.corpus / "manifest.json"
        if not manifest_file.exists():
            raise BadInputError(f"{self.corpus} is not a built corpus (no manifest.json); run `mechscope corpus build`")
        if self.split not in ("train", "heldout"):
            raise BadInputError(f"split must be 'train' or 'heldout', got {self.split!r}")
        if self.ctx_len < 2:
            raise BadInputError(f"ctx_len must be >= 2, got {self.ctx_len}")
        if self.mix not in MIXES:
            raise BadInputError(f"mix must be one of {', '.join(MIXES)}, got {self.mix!r}")
        self.manifest = manifest = json.loads(manifest_file.read_text())
        names = [e["name"] for e in manifest["sources"]]
        if self.sources is not None:
            unknown = sorted(set(self.sources) - set(names))
            if unknown or not self.sources:
                raise BadInputError(f"corpus {self.corpus} has no source(s) {unknown or list(self.sources)}; "
                                    f"its sources: {', '.join(names)}")
        for entry in manifest["sources"]:
            if self.sources is not None and entry["name"] not in self.sources:
                continue
            tokens = self._tokenized(entry["name"])
            if len(tokens) >= self.ctx_len:
                self._tokens.append(tokens)
                self._weights.append(entry["weight"])
        if not self._tokens:
            raise BadInputError(f"corpus {self.corpus} has no {self.split} text of {self.ctx_len} tokens")
        total = sum(self._weights)
        self._weights = [w / total for w in self._weights]
        if self.mix == "document":
            for tokens in self._tokens:  # documents end with the separator
                ends = np.flatnonzero(np.asarray(tokens) == self._separator)
                self._doc_starts.append(np.concatenate([[0], ends + 1])[:-1] if len(ends) else np.array([0]))

    @property
    def _separator(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0

    def _tokenized(self, name: str) -> np.ndarray:
        tok_key = hashlib.sha256(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:12]
        cache = self.corpus / "tokens" / tok_key / f"{name}.{self.split}.npy"
        if cache.exists():
            return np.load(cache, mmap_mode="r")
        docs = [json.loads(line)["text"] for line in (self.corpus / f"{name}.{self.split}.jsonl").open()]
        sep = self._separator
        ids: list[int] = []
        for start in range(0, len(docs), 256):
            for seq in self.tokenizer(docs[start : start + 256], add_special_tokens=False).input_ids:
                ids.extend(seq)
                ids.append(sep)
        array = np.asarray(ids, dtype=np.uint32)
        buffer = io.BytesIO()
        np.save(buffer, array)
        atomic_write_bytes(cache, buffer.getvalue())
        return array

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self._tokens)

    def sequence(self, index: int) -> np.ndarray:
        """Sequence ``index`` (``[ctx_len]`` uint32, BOS first)."""
        rng = np.random.default_rng([self.seed, index])
        if self.mix == "document":
            return self._mixed_sequence(rng)
        source = rng.choice(len(self._tokens), p=self._weights)
        tokens = self._tokens[source]
        start = int(rng.integers(0, len(tokens) - (self.ctx_len - 1) + 1))
        window = np.asarray(tokens[start : start + self.ctx_len - 1])
        return np.concatenate([[self.tokenizer.bos_token_id], window]).astype(np.int64)

    def _mixed_sequence(self, rng: np.random.Generator) -> np.ndarray:
        pieces, filled, longest = [np.array([self.tokenizer.bos_token_id])], 1, self.ctx_len - 1
        while filled < self.ctx_len:
            source = rng.choice(len(self._tokens), p=self._weights)
            tokens, starts = self._tokens[source], self._doc_starts[source]
            doc = int(rng.integers(len(starts)))
            doc_end = int(starts[doc + 1]) if doc + 1 < len(starts) else len(tokens)  # past its separator
            start = int(rng.integers(starts[doc], doc_end))
            length = int(rng.integers(min(self.min_piece, longest), longest + 1))
            piece = np.asarray(tokens[start : min(start + length, doc_end)])
            if piece[-1] != self._separator:
                piece = np.append(piece, self._separator)
            pieces.append(piece)
            filled += len(piece)
        return np.concatenate(pieces)[: self.ctx_len].astype(np.int64)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(next_index, [batch_size, ctx_len] int64)`` from sequence ``start`` on, forever."""
        index = start
        while True:
            batch = np.stack([self.sequence(i) for i in range(index, index + batch_size)])
            index += batch_size
            yield index, batch
