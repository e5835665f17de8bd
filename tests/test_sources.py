"""Readers of the offline registry sources: R lazy-load databases, Gutenberg chapters, Brown, HTML."""

from __future__ import annotations

import gzip
import lzma
import struct
import zlib

import numpy as np
import pytest
import rdata

from mechscope.data.sources import austen_chapters, detag_brown, email_text, html_to_text, read_r_lazyload_db
from mechscope.errors import BadInputError


def _serialize(obj) -> bytes:
    return rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(obj))


def _write_lazyload_db(stem, objects: dict, compressed: int) -> None:
    """Write ``stem.rdb``/``stem.rdx`` the way R's ``makeLazyLoadDB`` does (see the reader's docstring)."""
    data, variables = b"", {}
    for name, obj in objects.items():
        raw = _serialize(obj)
        body = zlib.compress(raw) if compressed == 1 else b"X" + lzma.compress(raw)
        chunk = struct.pack(">I", len(raw)) + body
        variables[name] = np.array([len(data), len(chunk)], dtype=np.int32)
        data += chunk
    stem.with_suffix(".rdb").write_bytes(data)
    index = {"variables": variables, "references": {}, "compressed": np.array([compressed], dtype=np.int32)}
    stem.with_suffix(".rdx").write_bytes(gzip.compress(_serialize(index)))


@pytest.mark.parametrize("compressed", [1, 3], ids=["zlib", "xz"])
def test_r_lazyload_db_round_trip(tmp_path, compressed):
    novels = {"emma": np.array(["EMMA", "", "CHAPTER I", "Emma Woodhouse,"]),
              "persuasion": np.array(["Persuasion", "Chapter 1", "Sir Walter Elliot"])}
    _write_lazyload_db(tmp_path / "Rdata", novels, compressed)
    read = read_r_lazyload_db(tmp_path / "Rdata")
    assert sorted(read) == ["emma", "persuasion"]
    for name, lines in novels.items():
        assert [str(x) for x in read[name]] == list(lines)


def test_r_lazyload_db_missing_files_are_a_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="no R lazy-load database"):
        read_r_lazyload_db(tmp_path / "Rdata")


def test_austen_chapters_join_paragraph_lines_and_drop_the_title_page():
    lines = ["PRIDE AND PREJUDICE", "", "By Jane Austen", "", "", "Chapter 1", "",
             "It is a truth universally acknowledged, that a single man in possession",
             "of a good fortune, must be in want of a wife.", "",
             "However little known", "", "CHAPTER II", "", "Mr. Bennet was among the earliest", ""]
    chapters = list(austen_chapters(lines))
    assert chapters == [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.\nHowever little known",
        "Mr. Bennet was among the earliest",
    ]


def test_detag_brown_restores_plain_text():
    tagged = "\n\n\tThe/at Fulton/np-tl County/nn-tl jury/nn said/vbd ``/`` it/pps did/dod n't/* ''/'' ./.\n"
    assert detag_brown(tagged) == 'The Fulton County jury said " it didn\'t ".'


def test_html_to_text_keeps_blocks_and_preformatted_code():
    markup = ("<html><head><title>x</title></head><body><nav>menu</nav><h1>Title</h1>"
              "<p>Some   <b>bold</b>\ntext.</p><pre>def f():\n    return 1</pre></body></html>")
    assert html_to_text(markup) == "Title\n\nSome bold text.\n\ndef f():\n    return 1"


def test_email_text_keeps_subject_and_plain_body_only():
    raw = (
        b"From: someone@example.org\r\nSubject: Re: kernel panic\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="XX"\r\n\r\n'
        b"--XX\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"> did you try a caf=E9 reboot?\r\nYes, twice.\r\n"
        b"--XX\r\nContent-Type: text/html\r\n\r\n<p>Yes, <b>twice</b>.</p>\r\n--XX--\r\n"
    )
    text = email_text(raw)
    assert text.startswith("Subject: Re: kernel panic\n\n")
    assert "> did you try a café reboot?" in text and "Yes, twice." in text
    assert "<p>" not in text and "someone@example.org" not in text and "Content-Type" not in text
