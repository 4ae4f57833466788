"""Log records are one line each, escaped, and never carry a secret (logs.py).

Each test logs through the real formatters into a buffer, the way
`setup_logging` wires them to stderr, with text a hostile document could put
into a message (newlines, ESC sequences, bidi overrides) or an exception.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from tiled_writer_sidecar.logs import (
    EXCEPTION_LIMIT,
    MESSAGE_LIMIT,
    TEXT_FORMAT,
    JsonFormatter,
    TextFormatter,
    redact,
    register_secret,
    setup_logging,
)

PREFIX = re.compile(r"^\[receiver\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) test\.logs: ")
FORGED = (
    "run start uid=x plan=scan\n2026-01-01 00:00:00,000 ERROR forged: SPOOL NOT WRITABLE\x1b[2J\r\x07\u202e"
)


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A logger writing through a handler into a buffer; the formatter is set per test."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    logger = logging.getLogger("test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, buffer, handler
    logger.handlers[:] = []
    logger.propagate = True


def raise_hostile() -> None:
    raise ValueError("bad plan [/bold]\nFAKE LINE\x1b]52;c;aGk=\x07")


def test_text_lines_escape_newlines_and_terminal_controls_in_messages(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    """A message with a newline, ESC, CR, BEL and a bidi override is one line starting with the
    timestamp prefix; each control character is shown as an escape."""
    logger, buffer, handler = capture
    handler.setFormatter(TextFormatter("[receiver] " + TEXT_FORMAT))
    logger.info("%s", FORGED)
    logger.warning("stream=%s count=%d", "[/y]\n", 3)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2
    assert all(PREFIX.match(line) for line in lines), lines
    assert lines[0].endswith(
        "plan=scan\\n2026-01-01 00:00:00,000 ERROR forged: SPOOL NOT WRITABLE\\x1b[2J\\r\\x07\\u202e"
    )
    assert lines[1].endswith("stream=[/y]\\n count=3")
    assert "\x1b" not in buffer.getvalue() and "\r" not in buffer.getvalue()


def test_text_exceptions_are_one_escaped_line_ending_with_the_error(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    """logger.exception: the traceback follows the message on the same line (newlines as \\n), the
    exception's own hostile text escaped; a huge traceback keeps its end (the error)."""
    logger, buffer, handler = capture
    handler.setFormatter(TextFormatter("[receiver] " + TEXT_FORMAT))
    try:
        raise_hostile()
    except ValueError:
        logger.exception("upload failed")
    try:
        raise RuntimeError("x" * (3 * EXCEPTION_LIMIT) + " the end")
    except RuntimeError:
        logger.error("huge", exc_info=True)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2
    assert all(PREFIX.match(line) for line in lines), lines
    assert "upload failed \\nTraceback (most recent call last):\\n" in lines[0]
    assert lines[0].endswith("ValueError: bad plan [/bold]\\nFAKE LINE\\x1b]52;c;aGk=\\x07")
    assert lines[1].endswith("x the end")
    assert len(lines[1]) < 2 * EXCEPTION_LIMIT + 200


def test_messages_are_bounded(capture: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    """A message of a megabyte (say, a 1 MB plan name) is cut to MESSAGE_LIMIT characters."""
    logger, buffer, handler = capture
    handler.setFormatter(TextFormatter("%(message)s"))
    logger.info("plan=%s", "p" * 2**20)
    (line,) = buffer.getvalue().splitlines()
    assert len(line) == MESSAGE_LIMIT and line.endswith("…")


def test_json_lines_are_one_object_each_with_the_same_escaped_message(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    """JSON format: one parseable object per line; msg and exc hold the same escaped text as the
    text format (no control character even after decoding)."""
    logger, buffer, handler = capture
    handler.setFormatter(JsonFormatter())
    logger.info("%s", FORGED)
    try:
        raise_hostile()
    except ValueError:
        logger.exception("upload failed")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"].endswith("SPOOL NOT WRITABLE\\x1b[2J\\r\\x07\\u202e")
    assert first["level"] == "info" and "exc" not in first
    assert second["exc"].endswith("FAKE LINE\\x1b]52;c;aGk=\\x07")
    for entry in (first, second):
        assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202e]", json.dumps(entry, ensure_ascii=False))


def test_secrets_are_redacted_in_both_formats(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    """A registered key, URL credentials and api_key=/token= parameters never reach a line."""
    logger, buffer, handler = capture
    register_secret("s3cr3t-registered-key")
    for formatter in (TextFormatter(TEXT_FORMAT), JsonFormatter()):
        handler.setFormatter(formatter)
        logger.info("key s3cr3t-registered-key in a message")
        logger.info("tiled down uri=http://alice:hunter22@tiled:8000/api?api_key=abcdef123456&x=1")
        logger.info("header Authorization: Apikey 0123456789abcdef")
    out = buffer.getvalue()
    for secret in ("s3cr3t-registered-key", "hunter22", "alice:", "abcdef123456", "0123456789abcdef"):
        assert secret not in out
    assert "http://***@tiled:8000/api?api_key=***&x=1" in out
    assert redact("see api_key_file or TILED_API_KEY") == "see api_key_file or TILED_API_KEY"


def test_setup_logging_redacts_the_environment_api_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """setup_logging registers TILED_API_KEY: a log line that contains it shows *** instead."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setenv("TILED_API_KEY", "env-key-4f9a1c")
    try:
        setup_logging("INFO", "text", role="receiver", capture=False)
        logging.getLogger("test.logs.env").warning("using env-key-4f9a1c now")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "env-key-4f9a1c" not in err
    assert "using *** now" in err
