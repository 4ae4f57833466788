"""Text from documents and the wire, made safe to show: one rule, used everywhere.

Any text a document, a wire frame, the spool or another process supplies may
hold terminal escape sequences (ESC [ ..., OSC 52 clipboard writes), ``\\r``
that overwrites a line, BEL, newlines that forge log lines, bidi overrides
that reorder what an operator reads, rich markup, or megabytes. `clean` turns
any value into a string that is safe on a terminal, in rich and in a log line:

- characters of the Unicode categories Cc (C0 controls, DEL, C1 controls
  including the 8-bit CSI), Cf (bidi overrides and isolates, zero-width
  characters, BOM), Cs (lone surrogates, which cannot even be encoded) and
  Zl/Zp (U+2028, U+2029) are written as Python-style escapes (``\\n``,
  ``\\x1b``, ``\\u202e``); everything else, backslashes included, is kept, so
  ``clean(clean(x)) == clean(x)``;
- at most `limit` characters: a longer result ends in "…";
- any object becomes a string with `str` first (bytes are decoded as UTF-8
  with backslash escapes); if that fails, ``<typename>``.

Rich shows the result only as a plain `Text` (`rich_text`), never as a markup
string: ``rich.markup.escape`` cannot express every string (a backslash
before ``[`` is lost), a `Text` has no markup to escape.

Where a text must stay ASCII (a rejection's detail, a reason naming an untrusted uid or key),
`ascii_text` bounds it the same way with ``ascii()`` escapes and "..."; `one_line` is an exception
as one such line (``Type: first line of its message``), even when its ``str()`` fails.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.text import Text

#: Default bound of one shown value (a name, a reason, one cell).
LIMIT = 200
#: Unicode categories written as escapes.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
ELLIPSIS = "…"

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _as_str(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - e.g. an int beyond the digit limit, a hostile __str__
        return f"<{type(value).__name__}>"


def escape_char(char: str) -> str:
    """`char` itself if it is safe to show, else its escape (``\\x1b``, ``\\u202e``, ``\\U000e0001``)."""
    if char.isprintable() or unicodedata.category(char) not in UNSAFE_CATEGORIES:
        return char
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def is_safe(text: str) -> bool:
    """True if `text` holds no character that `clean` would escape."""
    return text.isprintable() or all(escape_char(c) == c for c in text)


def clean(value: object, limit: int = LIMIT) -> str:
    """`value` as a string with no control characters and at most `limit` characters."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    text = _as_str(value)
    if len(text) <= limit and text.isprintable():
        return text
    # Each character gives at least one character, so limit + 1 of them settle the length.
    pieces = [escape_char(c) for c in text[: limit + 1]]
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    kept, used = [], 0
    for piece in pieces:
        if used + len(piece) > limit - 1:
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + ELLIPSIS


def ascii_text(value: object, limit: int) -> str:
    """`value` as printable ASCII of at most `limit` characters; a longer one ends in "...".

    A str that is printable ASCII is kept as it is, any other str becomes its ``ascii()``
    escapes without the quotes; any other value its ``ascii()``.
    """
    if isinstance(value, str):
        shown = value if value.isascii() and value.isprintable() else ascii(value)[1:-1]
    else:
        shown = ascii(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def one_line(err: BaseException, limit: int = 300) -> str:
    """`err` as one safe line: ``Type: first line of its message`` (escaped, bounded), or ``Type``."""
    try:
        lines = str(err).strip().splitlines()
    except Exception:  # noqa: BLE001 - str() itself failed (a huge int, a hostile __str__)
        lines = []
    return clean(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__, limit)


def rich_text(value: object, style: str = "", limit: int = LIMIT) -> Text:
    """`clean(value)` as a rich `Text` (never parsed as markup)."""
    from rich.text import Text

    return Text(clean(value, limit), style=style)


__all__ = ["LIMIT", "ascii_text", "clean", "escape_char", "is_safe", "one_line", "rich_text"]
