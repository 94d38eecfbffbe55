"""tritonsd.escape: text from files printed with every control, bidi and otherwise non-printable character
escaped, on one line, cut to an excerpt when long."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonsd.escape import escape, quote


@pytest.mark.parametrize("raw, shown", [
    ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),  # ANSI clear screen, OSC set-title
    ("line\nforged: error", "line\\x0aforged: error"),
    ("a\rb\tc\x00d", "a\\x0db\\x09c\\x00d"),
    ("del\x7f", "del\\x7f"),
    ("csi\x9b31m nel\x85", "csi\\x9b31m nel\\x85"),  # C1: the 8-bit CSI and NEXT LINE
    ("\u202eexe.txt", "\\u202eexe.txt"),  # RIGHT-TO-LEFT OVERRIDE
    ("\u2066\u2067\u2068\u2069\u202a\u202b\u202c\u202d", "\\u2066\\u2067\\u2068\\u2069\\u202a\\u202b\\u202c\\u202d"),
    ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),  # LRM, RLM, ALM
    ("para\u2028graph\u2029", "para\\u2028graph\\u2029"),
    ("surrogate\udcff", "surrogate\\udcff"),  # a non-UTF-8 file name under surrogateescape
    ("tag\U000e0041", "tag\\U000e0041"),
])
def test_escapes(raw, shown):
    assert escape(raw) == shown


def test_printable_text_is_unchanged():
    text = "model.diffusion_model.input_blocks.0.0.weight café 東京 🙂 a\\b \"q\" 'x'"
    assert escape(text) == text


def test_long_text_becomes_an_excerpt_with_its_length():
    assert escape("x" * 100_000, limit=20) == "x" * 20 + "...(100000 chars)"
    assert escape("x" * 20, limit=20) == "x" * 20
    assert escape("\n" * 5, limit=2) == "\\x0a\\x0a...(5 chars)"
    assert len(escape("y" * 10**6)) < 250  # the default limit
    assert escape("z" * 1000, limit=None) == "z" * 1000


def test_quote_and_non_strings():
    assert quote("a\nb") == "'a\\x0ab'"
    assert escape(b"\x1b") == "b'\\x1b'"  # str() of bytes is already escaped; nothing raw gets through
    assert escape(12) == "12"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec=None), max_size=300), st.integers(min_value=1, max_value=400))
def test_any_text_becomes_one_printable_utf8_line(text, limit):
    out = escape(text, limit=limit)
    out.encode("utf-8")  # no lone surrogate left: printing cannot raise
    assert all(ch == " " or ch.isprintable() for ch in out)
    assert not any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in out)
    assert len(out) <= 10 * limit + 30
    if len(text) <= limit:
        assert "...(" not in out or "...(" in text
