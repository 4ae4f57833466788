"""Logging: one line per event, key=value text or JSON, never a secret.

Both processes of the daemon log to stderr (the journal under systemd).
``format = "json"`` emits one JSON object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.processName if record.processName != "MainProcess" else None,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps({k: v for k, v in entry.items() if v is not None})


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO", fmt: str = "text", role: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"[{role}] " if role else ""
        handler.setFormatter(logging.Formatter(prefix + TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The Tiled client logs every HTTP request at INFO; keep the journal readable.
    for noisy in ("httpx", "httpcore", "tiled", "bluesky_tiled_plugins", "numexpr"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
