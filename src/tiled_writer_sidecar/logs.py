"""Logging: one line per event, key=value text or JSON, never a secret.

Both processes of the daemon log to stderr (the journal under systemd).
``format = "json"`` emits one JSON object per line for log shippers.

A log message often carries text from a document or the wire (a plan name,
a stream name, a rejected message's detail, an exception's message). Both
formatters pass the message and the exception text through the one escaping
rule (`text.clean`): newlines, ESC and every other control character become
visible escapes, so a record is always exactly one line that starts with the
timestamp, and nothing a sender chose reaches the terminal that shows the
log. A traceback is one line too (its newlines escaped as ``\\n``), bounded
to its last `EXCEPTION_LIMIT` characters (the end names the error).

Secrets are redacted before that: the Tiled API key of the environment
(``TILED_API_KEY``, registered by `setup_logging`) and any value given to
`register_secret`, URL credentials (``//user:pass@``) and ``api_key=...``
style parameters.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

from .text import ELLIPSIS, clean

#: Longest message kept, in characters (after escaping).
MESSAGE_LIMIT = 4000
#: Longest exception text kept (its end), in characters (after escaping).
EXCEPTION_LIMIT = 16000
REDACTED = "***"
#: Shortest registered secret that is redacted (shorter ones would mangle ordinary words).
MIN_SECRET = 6

_secrets: set[str] = set()
_PATTERNS = (
    (re.compile(r"(?<=://)[^/\s@]+:[^/\s@]*@"), REDACTED + "@"),
    (
        re.compile(
            r"(?i)\b(api[_-]?key|access[_-]?token|refresh[_-]?token|token|password|passwd|secret)=[^&\s'\",;]+"
        ),
        r"\1=" + REDACTED,
    ),
    (re.compile(r"(?i)\b(apikey|bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + REDACTED),
)


def register_secret(value: str | None) -> None:
    """Redact `value` from every log line from now on (ignored if empty or too short)."""
    if value and len(value.strip()) >= MIN_SECRET:
        _secrets.add(value.strip())


def redact(text: str) -> str:
    """`text` with registered secrets, URL credentials and ``key=value`` secrets replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def safe_message(record: logging.LogRecord) -> str:
    """The record's message: redacted, escaped, bounded (one line)."""
    try:
        message = record.getMessage()
    except Exception as err:  # noqa: BLE001 - a bad format string must not lose the record
        message = f"{record.msg!r} (unformattable: {type(err).__name__})"
    return clean(redact(message), MESSAGE_LIMIT)


def safe_exception(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    """The record's exception and stack text as one escaped, bounded line, or None."""
    parts = []
    if record.exc_info:
        parts.append(formatter.formatException(record.exc_info))
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    if not parts:
        return None
    text = redact("\n".join(parts).rstrip("\n"))
    if len(text) > EXCEPTION_LIMIT:
        text = ELLIPSIS + text[-EXCEPTION_LIMIT:]
    return clean(text, 2 * EXCEPTION_LIMIT)


class TextFormatter(logging.Formatter):
    """``fmt`` with the message and the exception escaped: one line per record, always."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = safe_message(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        exception = safe_exception(self, record)
        return line if exception is None else f"{line} \\n{exception}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.processName if record.processName != "MainProcess" else None,
            "msg": safe_message(record),
            "exc": safe_exception(self, record),
        }
        return json.dumps({k: v for k, v in entry.items() if v is not None})


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO", fmt: str = "text", role: str = "") -> None:
    register_secret(os.environ.get("TILED_API_KEY"))
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"[{role}] " if role else ""
        handler.setFormatter(TextFormatter(prefix + TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The Tiled client logs every HTTP request at INFO; keep the journal readable.
    for noisy in ("httpx", "httpcore", "tiled", "bluesky_tiled_plugins", "numexpr"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "redact",
    "register_secret",
    "safe_message",
    "setup_logging",
]
