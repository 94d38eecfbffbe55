"""Text that came from a file (tensor names, metadata, YAML values, file names) made safe to print.

A name read from a checkpoint can hold anything: an ANSI escape sequence that rewrites the terminal, a newline
that forges a second error line, a bidi override that shows text in another order than it is stored, a lone
surrogate (from a file name that is not UTF-8) that makes ``print`` itself raise. ``escape`` turns every such
character into a visible ``\\xNN`` / ``\\uNNNN`` / ``\\UNNNNNNNN`` escape and cuts long text to an excerpt.
"""

from __future__ import annotations

DEFAULT_LIMIT = 200  # characters of the original text shown before it is cut


def escape(text: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """``text`` (``str(text)`` for anything else) with every non-printable character escaped, on one line.

    Escaped: C0 controls (newline, tab, ESC ...), DEL, C1 controls, the bidi controls (U+202A-202E, U+2066-2069,
    LRM/RLM/ALM), zero-width and other format characters, line/paragraph separators, surrogates, private-use
    and unassigned code points: everything ``str.isprintable`` rejects except the plain space. Text longer than
    ``limit`` characters is cut to its first ``limit`` characters followed by ``...(N chars)``, N the full
    length; ``limit=None`` keeps it whole.
    """
    text = text if isinstance(text, str) else str(text)
    cut = limit is not None and len(text) > limit
    shown = text[:limit] if cut else text
    out = "".join(ch if ch == " " or ch.isprintable() else _escape_char(ch) for ch in shown)
    return f"{out}...({len(text)} chars)" if cut else out


def quote(text: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """``escape(text)`` in single quotes, for naming a value inside a message: ``tensor 'a\\x1b[2J'``."""
    return f"'{escape(text, limit)}'"


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
