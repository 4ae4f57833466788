"""Log records are one line each, escaped, and never carry a secret (logs.py).

Each test logs through the real formatters into a buffer, the way
`setup_logging` wires them to stderr, with text a hostile document could put
into a message (newlines, ESC sequences, bidi overrides) or an exception.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiled_writer_sidecar import logs
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


# ------------------------------------------------------------------ journald (issue 22)


def test_json_lines_carry_the_named_values_as_fields_and_the_syslog_priority(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    """`key=%s` values become fields (typed, escaped, redacted), `extra=` too; a field never replaces
    the entry's own keys (level); PRIORITY is syslog's, SYSLOG_IDENTIFIER the program's."""
    logger, buffer, handler = capture
    handler.setFormatter(JsonFormatter(role="uploader"))
    register_secret("field-secret-91ab")
    logger.warning(
        "tiled down uri=%s: %s; retries=%d lag=%.1f",
        "http://tiled:8000",
        "boom\nx field-secret-91ab",
        3,
        0.25,
        extra={"run": "abc", "level": "forged"},
    )
    entry = json.loads(buffer.getvalue())
    assert entry["uri"] == "http://tiled:8000" and entry["retries"] == 3 and entry["lag"] == 0.25
    assert entry["run"] == "abc" and entry["msg"].startswith("tiled down uri=http://tiled:8000: boom\\nx ***")
    assert entry["PRIORITY"] == 4 and entry["SYSLOG_IDENTIFIER"] == "tiled-writer-sidecar"
    assert entry["role"] == "uploader" and entry["level"] == "warning"


@pytest.mark.parametrize(("level", "priority"), [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                                                 (logging.ERROR, 3), (logging.CRITICAL, 2)])  # fmt: skip
def test_priorities_are_syslogs(level: int, priority: int) -> None:
    assert logs.priority(level) == priority


@pytest.mark.process
def test_under_journald_every_line_starts_with_its_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOURNAL_STREAM names stderr's device and inode (as systemd sets it): `<N>` prefixes; else none."""
    code = (
        "import logging, os\n"
        "st = os.fstat(2)\n"
        "if os.environ.get('AS_JOURNAL'): os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from tiled_writer_sidecar.logs import setup_logging\n"
        "setup_logging('INFO', os.environ['FORMAT'], role='receiver')\n"
        "logging.getLogger('x').warning('careful n=%d', 1)\n"
        "logging.getLogger('x').error('broken')\n"
    )
    for fmt in ("text", "json"):
        for journal in ("1", ""):
            with (tmp_path / "err").open("w") as err:
                subprocess.run(
                    [sys.executable, "-c", code],
                    stderr=err,
                    env={**os.environ, "FORMAT": fmt, "AS_JOURNAL": journal},
                    timeout=60,
                    check=True,
                )
            lines = (tmp_path / "err").read_text().splitlines()
            assert [line[:3] for line in lines] == (
                ["<4>", "<3>"] if journal else [lines[0][:3], lines[1][:3]]
            )
            if not journal:
                assert not lines[0].startswith("<")
            if fmt == "json":
                assert json.loads(lines[0].removeprefix("<4>"))["n"] == 1


@pytest.mark.process
def test_a_daemon_captures_what_libraries_print_warnings_and_uncaught_errors(tmp_path: Path) -> None:
    """A role's process: tiled's bare `Retrying…` on stderr, a print on stdout, a warning and an uncaught
    exception each become one JSON record; nothing else reaches stderr."""
    code = (
        "import logging, sys, warnings\n"
        "from tiled_writer_sidecar.logs import setup_logging\n"
        "setup_logging('INFO', 'json', role='uploader')\n"
        "sys.stderr.write('Retrying\\u2026\\n')\n"
        "print('from a library')\n"
        "warnings.warn('old API')\n"
        "raise ValueError('bad\\nthing')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1 and result.stdout == ""
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(e["logger"], e["level"]) for e in entries] == [
        ("stderr", "warning"),
        ("stdout", "info"),
        ("py.warnings", "warning"),
        ("uncaught", "critical"),
    ]
    assert entries[0]["msg"] == "Retrying\u2026" and entries[1]["msg"] == "from a library"
    assert "ValueError: bad\\nthing" in entries[3]["exc"]
