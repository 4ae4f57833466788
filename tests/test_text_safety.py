"""The one escaping rule (`text.clean`) and what every renderer makes of hostile text.

Unit tests pin the rule (which characters are escaped and how, the length
bound, idempotence); hypothesis checks it for arbitrary text, and then feeds
arbitrary text into every document field that reaches `status` or `monitor`
rendering: rendering never raises, never emits a control character of its
own (only rich's SGR colour sequences remain once those are removed) and
never interprets document text as markup.
"""

from __future__ import annotations

import io
import re
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text

from tests.support.strength import examples
from tiled_writer_sidecar.text import (
    ELLIPSIS,
    LIMIT,
    clean,
    escape_char,
    is_safe,
    rich_text,
)

#: Characters a hostile document uses: terminal controls, bidi overrides, line separators,
#: markup, surrogates; mixed with ordinary text.
HOSTILE = st.sampled_from(
    [
        "\x1b[2J", "\x1b]52;c;aGk=\x07", "\r", "\n", "\x07", "\x00", "\x7f", "\x9b31m", "\x85",
        "\u202e", "\u2066", "\u200b", "\u2028", "\u2029", "\ufeff", "\ud800", "[/bold]", "[/y]",
        "[bold]", "[link=x]", "\\", "\\[", ":smile:", "é", "日本", "\u00a0", " ",
    ]
)  # fmt: skip
HOSTILE_TEXT = st.lists(HOSTILE | st.text(max_size=4), max_size=12).map("".join)


def unsafe_characters(out: str) -> list[str]:
    return [
        c for c in out if not c.isprintable() and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")
    ]


# -------------------------------------------------------------- the rule
def test_controls_become_visible_escapes_and_plain_text_is_unchanged() -> None:
    """ESC, newline, CR, tab, BEL, DEL, C1, bidi overrides and U+2028/9 are written as escapes;
    ordinary text (accents, CJK, no-break space, backslashes, brackets) is returned unchanged."""
    assert clean("[/bold]\x1b[2J") == "[/bold]\\x1b[2J"
    assert clean("[/y]\n") == "[/y]\\n"
    assert clean("a\rb\tc\x07d\x7fe\x9bf") == "a\\rb\\tc\\x07d\\x7fe\\x9bf"
    assert clean("abc\u202edef\u2066") == "abc\\u202edef\\u2066"
    assert clean("x\u2028y\u2029z\u200b") == "x\\u2028y\\u2029z\\u200b"
    assert clean("tag\U000e0041") == "tag\\U000e0041"
    ordinary = "scan é 日本\u00a0 C:\\data [1] [bold]"
    assert clean(ordinary) == ordinary


def test_any_value_becomes_a_string_and_a_failing_str_is_named() -> None:
    """Numbers and None via str, bytes as UTF-8 with escapes, an int beyond the digit limit and a
    raising __str__ as <typename>, never an exception."""

    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert clean(42) == "42"
    assert clean(None) == "None"
    assert clean(b"ok\xff\x1b") == "ok\\xff\\x1b"
    assert clean(10**5000) == "<int>"
    assert clean(Hostile()) == "<Hostile>"
    assert clean("\ud800") == "\\ud800"  # a lone surrogate could not even be encoded


def test_length_is_bounded_with_an_ellipsis_and_escapes_are_never_cut() -> None:
    """At most `limit` characters; longer text ends in '…'; an escape is dropped whole, not cut."""
    assert clean("x" * 10, limit=10) == "x" * 10
    assert clean("x" * 11, limit=10) == "x" * 9 + ELLIPSIS
    assert clean("x" * 10**6) == "x" * (LIMIT - 1) + ELLIPSIS
    assert clean("abcdefg\x1b", limit=10) == "abcdefg" + ELLIPSIS  # '\x1b' (4) would not fit
    assert clean("\n" * 10, limit=5) == "\\n\\n" + ELLIPSIS


def test_text_is_a_plain_rich_text_never_markup() -> None:
    """`rich_text()` gives a Text whose plain string is the cleaned value, markup left as it is."""
    shown = rich_text("[/bold]\x1b[2J", style="red")
    assert isinstance(shown, Text)
    assert shown.plain == "[/bold]\\x1b[2J"
    assert shown.spans == []


@settings(max_examples=examples(500))
@given(st.one_of(st.text(), HOSTILE_TEXT), st.integers(min_value=1, max_value=300))
def test_clean_is_safe_bounded_and_idempotent(value: str, limit: int) -> None:
    """For any text and limit: no unsafe character, at most `limit` characters, clean(clean(x))
    == clean(x), and text that is already safe and short is returned as it is."""
    out = clean(value, limit)
    assert unsafe_characters(out) == []
    assert is_safe(out)
    assert len(out) <= limit
    assert clean(out, limit) == out
    if is_safe(value) and len(value) <= limit:
        assert out == value


@given(st.characters())
def test_escape_char_agrees_with_the_unicode_categories(char: str) -> None:
    """One character is kept exactly when it is not in an unsafe category (or is printable)."""
    kept = escape_char(char) == char
    assert kept == (char.isprintable() or unicodedata.category(char) not in ("Cc", "Cf", "Cs", "Zl", "Zp"))


# --------------------------------------------------------- rendered output
SGR = re.compile(r"\x1b\[[0-9;]*m")


def terminal_output(renderable: object, width: int = 200) -> str:
    """What rich writes to a colour terminal for `renderable`."""
    buffer = io.StringIO()
    console = Console(
        file=buffer, force_terminal=True, color_system="truecolor", width=width, legacy_windows=False
    )
    console.print(renderable)
    return buffer.getvalue()


def assert_terminal_safe(out: str) -> None:
    """Only rich's own colour sequences and line ends: no control character from the data."""
    stripped = SGR.sub("", out).replace("\n", "")
    assert unsafe_characters(stripped) == [], repr(stripped)


# A document field: hostile pieces mixed with arbitrary text, short enough to be shown whole.
FIELD = st.one_of(HOSTILE_TEXT, st.text(max_size=30)).map(lambda s: s[:30])


@st.composite
def hostile_documents(draw: st.DrawFn) -> list[tuple[str, dict[str, object]]]:
    """One run whose every text field is drawn from FIELD (uid, scan_id, plan, detectors, stream,
    data keys and string values, exit status, reason, num_events keys)."""
    uid, descriptor, stream, key, value = (draw(FIELD) for _ in range(5))
    scan_id = draw(st.one_of(FIELD, st.integers()))
    return [
        (
            "start",
            {
                "uid": uid,
                "time": 1.7e9,
                "scan_id": scan_id,
                "plan_name": draw(FIELD),
                "detectors": [draw(FIELD)],
            },
        ),
        (
            "descriptor",
            {
                "uid": descriptor,
                "run_start": uid,
                "name": stream,
                "data_keys": {key: {"dtype": "string", "shape": []}, "n": {"dtype": "number", "shape": []}},
            },
        ),
        ("event", {"descriptor": descriptor, "seq_num": 1, "data": {key: value, "n": 1.0}}),
        ("event", {"descriptor": descriptor, "seq_num": 3, "data": {key: draw(FIELD), "n": 2.0}}),
        (
            "stop",
            {
                "run_start": uid,
                "time": 1.7e9 + 5,
                "exit_status": draw(FIELD),
                "reason": draw(FIELD),
                "num_events": {stream: 4, draw(FIELD): 1},
            },
        ),
    ]


@st.composite
def hostile_health(draw: st.DrawFn) -> dict[str, object]:
    """A /healthz body whose text (and some numbers) are arbitrary."""
    number = st.one_of(st.integers(), st.floats(), FIELD)
    return {
        "status": draw(FIELD),
        "reasons": [draw(FIELD), draw(FIELD)],
        "tiled": {"state": draw(FIELD), "since": draw(number), "last_error": draw(FIELD)},
        "spool": {
            "backlog_documents": draw(number),
            "backlog_bytes": draw(number),
            "backlog_runs": draw(number),
        },
        "upload": {"documents": draw(number), "rows": draw(number), "last_lag_seconds": draw(number)},
        "receiver": {"messages": draw(number), "gaps": draw(number), "dropped": draw(number)},
        "runs": [{"uid": draw(FIELD), "state": draw(FIELD), "documents": draw(number)}],
    }


@settings(max_examples=examples(150), deadline=None)
@given(hostile_documents(), hostile_health(), st.sampled_from([200, 90]))
def test_monitor_rendering_of_arbitrary_text_is_safe(
    docs: list[tuple[str, dict[str, object]]], health: dict[str, object], width: int
) -> None:
    """Any text in any document field or /healthz field: the monitor's screen renders without an
    exception, writes no control character but rich's colours, and shows each name literally
    (markup is text, not style)."""
    from tiled_writer_sidecar.tools.monitor.main import render
    from tiled_writer_sidecar.tools.monitor.state import MonitorState

    state = MonitorState(address="tcp://127.0.0.1:5578", sidecar_url="http://127.0.0.1:9478/healthz")
    for name, doc in docs:
        state.feed(name, doc)
    state.set_health(health)
    snap = state.snapshot()
    out = terminal_output(render(snap, width), width=width)
    assert_terminal_safe(out)
    if width == 200 and snap["run"] is not None:
        plain = Console(width=400, record=True, file=io.StringIO())
        plain.print(render(snap, 400))
        shown = plain.export_text()
        assert clean(docs[0][1]["plan_name"], 80) in shown
        assert clean(docs[1][1]["name"], 64) in shown


@settings(max_examples=examples(150), deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "uid": FIELD,
                "scan_id": st.one_of(FIELD, st.integers(), st.none()),
                "plan_name": st.one_of(FIELD, st.none()),
                "state": FIELD,
                "documents": st.integers(min_value=0),
                "uploaded_documents": st.integers(min_value=0),
                "problems": st.lists(FIELD, max_size=3),
                "reason": st.one_of(FIELD, st.none()),
            }
        ),
        min_size=1,
        max_size=4,
    ),
    FIELD,
)
def test_status_rendering_of_arbitrary_text_is_safe(runs: list[dict[str, object]], tiled: str) -> None:
    """Any text in the spool's per-run fields (uid, scan_id, plan, state, problems, reason) and in
    uploader.json's Tiled state: the status table renders without an exception, writes no control
    character but rich's colours, and shows each plan name literally."""
    from tiled_writer_sidecar.commands.status import print_status

    report = {
        "spool": "/var/lib/spool\x1b[2J",
        "runs": runs,
        "totals": {
            "runs": len(runs),
            "documents": 0,
            "uploaded_documents": 0,
            "bytes": 0,
            "by_state": {"pending": len(runs)},
            "gaps": 0,
            "oldest_unuploaded_age_seconds": None,
        },
        "receiver_running": True,
        "uploader_running": False,
        "uploader": {"tiled": tiled},
    }
    buffer = io.StringIO()
    print_status(
        report, False, Console(file=buffer, force_terminal=True, color_system="truecolor", width=120)
    )
    assert_terminal_safe(buffer.getvalue())
    wide = io.StringIO()
    print_status(report, False, Console(file=wide, width=2000))
    for run in runs:
        assert clean(run["plan_name"] or "") in wide.getvalue()
