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

For the journal: JSON lines carry the values a message names as fields
(``"tiled down uri=%s"`` gives ``"uri": ...``, and any ``extra=`` given to the
call), with ``PRIORITY`` and ``SYSLOG_IDENTIFIER``; under journald (stderr is
``$JOURNAL_STREAM``) every line starts with its syslog priority (``<4>`` for a
warning), which journald strips and stores, so ``journalctl -p warning`` works.
A daemon process (a `role`) also captures what libraries write to stderr or
stdout themselves (tiled's client writes a bare ``Retrying…``), Python
warnings and uncaught exceptions: each becomes a record of the same format.

Secrets are redacted before that: the Tiled API key of the environment
(``TILED_API_KEY``, registered by `setup_logging`) and any value given to
`register_secret`, URL credentials (``//user:pass@``) and ``api_key=...``
style parameters.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from types import TracebackType
from typing import TextIO

from tiled_writer_sidecar.text import ELLIPSIS, clean

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


#: Python's level -> syslog priority (RFC 5424): what journald and `journalctl -p` use.
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
SYSLOG_IDENTIFIER = "tiled-writer-sidecar"
FIELD_LIMIT = 500  # longest value of one field, in characters (after escaping)
#: A printf placeholder, with the ``name=`` before it if any (``%%`` is not one).
_PLACEHOLDER = re.compile(
    r"(?:\b([A-Za-z_][A-Za-z0-9_]*)=)?%(?:\([^)]*\))?[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[diouxXeEfFgGcrsa%]"
)
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def priority(levelno: int) -> int:
    """The syslog priority of a Python log level (a custom level: the next standard one above it)."""
    for level in sorted(SYSLOG_PRIORITY):
        if levelno <= level:
            return SYSLOG_PRIORITY[level]
    return 2


def _field(value: object) -> object:
    """A field's value as JSON shows it: a number or bool as it is, anything else as a clean string."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return clean(redact(str(value)), FIELD_LIMIT)


def fields(record: logging.LogRecord) -> dict[str, object]:
    """The values the message names (``key=%s``) and the ``extra=`` of the call, redacted and escaped."""
    found: dict[str, object] = {}
    args = record.args if isinstance(record.args, tuple) else ()
    if args and isinstance(record.msg, str):
        index = 0
        for match in _PLACEHOLDER.finditer(record.msg):
            if match.group(0).endswith("%%"):
                continue
            if index >= len(args):
                break
            if match.group(1):
                found[match.group(1)] = _field(args[index])
            index += 1
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
            found[key] = _field(value)
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, priority, logger, message, fields, exception."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self.role = role
        self.instance = os.environ.get("TILED_WRITER_SIDECAR_INSTANCE") or None

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
            "role": self.role or None,
            "instance": self.instance,
            "pid": record.process,
            "logger": record.name,
            "process": record.processName if record.processName != "MainProcess" else None,
            "msg": safe_message(record),
            "exc": safe_exception(self, record),
        }
        for key, value in fields(record).items():
            entry.setdefault(key, value)  # a field never replaces one of the above
        return json.dumps({k: v for k, v in entry.items() if v is not None})


class PriorityPrefix(logging.Formatter):
    """Wraps a formatter: each line starts with ``<N>``, its syslog priority (for journald)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{self.inner.format(record)}"


def under_journald(stream: TextIO) -> bool:
    """Whether `stream` is the journal's stream socket (systemd sets ``JOURNAL_STREAM=dev:inode``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class StreamToLog(io.TextIOBase):
    """A text stream whose every complete line becomes one record of `logger` (what libraries print).

    A write while a record is being emitted (a handler's own error report)
    goes to `fallback` as it is, so nothing loops.
    """

    def __init__(self, logger: logging.Logger, level: int, fallback: TextIO) -> None:
        super().__init__()
        self.logger, self.level, self.fallback = logger, level, fallback
        self._buffer = ""
        self._lock = threading.RLock()
        self._busy = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._busy, "active", False):
            return self.fallback.write(text)
        with self._lock:
            self._buffer += text
            *lines, self._buffer = self._buffer.split("\n")
            if len(self._buffer) > MESSAGE_LIMIT:  # no newline coming: emit what there is
                lines.append(self._buffer)
                self._buffer = ""
        for line in lines:
            if line.strip():
                self._busy.active = True
                try:
                    self.logger.log(self.level, "%s", line.rstrip("\r"))
                finally:
                    self._busy.active = False
        return len(text)

    def flush(self) -> None:
        with self._lock:
            rest, self._buffer = self._buffer, ""
        if rest.strip():
            self.write(rest + "\n")

    def isatty(self) -> bool:
        return False  # libraries then write plain lines (tiled: no spinner), never terminal controls

    def fileno(self) -> int:
        return self.fallback.fileno()


def _capture(stream: TextIO) -> None:
    """Route stray stderr/stdout lines, warnings and uncaught exceptions into the log."""
    sys.stderr = StreamToLog(logging.getLogger("stderr"), logging.WARNING, stream)
    sys.stdout = StreamToLog(logging.getLogger("stdout"), logging.INFO, stream)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    uncaught = logging.getLogger("uncaught")

    def excepthook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        uncaught.critical("uncaught %s: %s", kind.__name__, err, exc_info=(kind, err, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            name = args.thread.name if args.thread else "?"
            uncaught.critical(
                "uncaught %s in thread=%s: %s",
                args.exc_type.__name__,
                name,
                args.exc_value,
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
            )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    level: str = "INFO", fmt: str = "text", role: str = "", capture: bool | None = None
) -> None:
    """Log to stderr in `fmt`; a daemon process (`role`) also captures stray output (`capture`)."""
    register_secret(os.environ.get("TILED_API_KEY"))
    stream = sys.stderr
    if isinstance(stream, StreamToLog):  # set up twice in one process: the real stream
        stream = stream.fallback
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(role)
    else:
        prefix = f"[{role}] " if role else ""
        formatter = TextFormatter(prefix + TEXT_FORMAT)
    handler.setFormatter(PriorityPrefix(formatter) if under_journald(stream) else formatter)
    if capture if capture is not None else bool(role):
        _capture(stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The Tiled client logs every HTTP request at INFO; keep the journal readable.
    for noisy in ("httpx", "httpcore", "tiled", "bluesky_tiled_plugins", "numexpr"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


__all__ = [
    "JsonFormatter",
    "PriorityPrefix",
    "StreamToLog",
    "TextFormatter",
    "fields",
    "priority",
    "redact",
    "register_secret",
    "safe_message",
    "setup_logging",
    "under_journald",
]
