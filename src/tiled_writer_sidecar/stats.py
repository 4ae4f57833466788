"""Plain counters shared by the receiver loop and the metrics endpoint.

The receiver increments plain integers (a Prometheus counter takes a lock
per increment, too slow at 50,000 documents/s); `metrics.py` reads them when
`/metrics` is scraped.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ReceiverStats:
    messages: int = 0
    bytes: int = 0
    documents: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    gaps: int = 0
    dropped: int = 0
    runs_started: int = 0
    spool_bytes: int = 0
    spool_writable: bool = True
    started: float = field(default_factory=time.time)
    last_message: float = 0.0
    connected: bool = False
    subscription_problem: str | None = None
    proxy_absent: str | None = None  # `Subscription.absent`: no proxy connection for a while
