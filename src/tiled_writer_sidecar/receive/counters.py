"""Plain counters shared by the receiver loop and the metrics endpoint.

The receiver increments plain integers (a Prometheus counter takes a lock
per increment, too slow at 50,000 documents/s); `daemon/metrics.py` reads them when
`/metrics` is scraped.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiled_writer_sidecar.receive.ledger import RunLedger


@dataclass
class ReceiverStats:
    messages: int = 0
    bytes: int = 0
    documents: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    gaps: int = 0  # events missing in closed runs: seq_num holes and stop.num_events shortfalls
    dropped: int = 0
    runs_started: int = 0
    runs_stop_missing: int = 0  # runs closed without their stop
    events_out_of_order: int = 0  # late events kept (a seq_num that filled a hole)
    orphan_runs: int = 0  # orphans held now: runs whose start never came (spool/orphans.py)
    orphan_runs_total: int = 0
    orphan_documents: int = 0  # documents spooled into orphans
    orphan_bytes: int = 0
    spool_bytes: int = 0
    spool_segments: int | None = None  # measured off the receive path by the receiver (None: not yet)
    spool_writable: bool = True
    started: float = field(default_factory=time.time)
    last_message: float = 0.0
    connected: bool = False
    subscription_problem: str | None = None
    ledger: RunLedger | None = None  # the receiver's runs not yet uploaded, for health (receive/ledger.py)
    proxy_absent: str | None = None  # `Subscription.absent`: no proxy connection for a while
