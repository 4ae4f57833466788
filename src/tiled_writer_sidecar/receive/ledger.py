"""The receiver's ledger of the runs the uploader has not finished, for ``/healthz``.

Kept as the receiver spools (O(1) per run), so a health snapshot never lists the whole spool:
it reads at most `CHECKS_PER_SNAPSHOT` ``uploaded.json`` files and the newest `RECENT_RUNS` runs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import Received, RunView, Uploaded

RECENT_RUNS = 20  # runs listed in the snapshot, newest last
CHECKS_PER_SNAPSHOT = 64  # uploaded.json files a snapshot reads: the oldest waiting runs, then in turn


class RunLedger:
    """The runs the uploader has not finished, kept by the receiver as it spools (O(1) per run).

    `note` a run as it starts, closes or is reopened (its `Received` is the
    live one: an open run's counts need no update); `load` the runs found in
    the spool at start-up. The backlog's totals are running sums over the
    closed runs plus a sum over the open ones (few). Which runs are finished
    is learnt from their ``uploaded.json``, a bounded number per `backlog`
    call: the oldest waiting runs first (the uploader finishes those first),
    then the others in turn.
    """

    def __init__(self, spool: SpoolDir) -> None:
        self.spool = spool
        self.lock = threading.Lock()
        self.runs = 0  # runs spooled: found at start-up and started since
        self.pending: dict[str, list[Any]] = {}  # uid -> [received, uploaded documents], oldest first
        self.open: set[str] = set()  # pending runs still receiving (their counts change)
        self.closed_documents = self.closed_bytes = 0  # backlog of the pending closed runs
        self.recent: deque[str] = deque(maxlen=RECENT_RUNS)
        self._turn = 0

    def load(self, views: Iterable[RunView]) -> None:
        """The runs of the spool at start-up (oldest first)."""
        for view in views:
            if view.uploaded.state.finished:
                with self.lock:
                    self.runs += 1
                    self.recent.append(view.uid)
            else:
                self.note(view.received, view.uploaded.documents)

    def note(self, received: Received, uploaded: int = 0) -> None:
        """A run started, closed or was reopened (`received` is its current state)."""
        with self.lock:
            uid = received.uid
            entry = self.pending.get(uid)
            if entry is None:
                self.runs += 1
                self.recent.append(uid)
                entry = self.pending[uid] = [received, uploaded]
            elif uid not in self.open:
                self._count(entry, -1)
            entry[0] = received
            if received.closed:
                self.open.discard(uid)
                self._count(entry, 1)
            else:
                self.open.add(uid)

    def _count(self, entry: list[Any], sign: int) -> None:
        received, uploaded = entry
        self.closed_documents += sign * max(0, received.documents - uploaded)
        self.closed_bytes += sign * received.bytes

    def backlog(self) -> tuple[int, int, int, float | None]:
        """Runs, documents and bytes not yet uploaded, and the oldest run's first document time, after
        reading a bounded number of ``uploaded.json``."""
        with self.lock:
            uids = list(islice(self.pending, CHECKS_PER_SNAPSHOT // 2))
            rest = len(self.pending) - len(uids)
            if rest > 0:
                start = len(uids) + self._turn % rest
                uids += list(islice(self.pending, start, start + CHECKS_PER_SNAPSHOT - len(uids)))
                self._turn += CHECKS_PER_SNAPSHOT - CHECKS_PER_SNAPSHOT // 2
            for uid in uids:
                self._check(uid)
            documents, size = self.closed_documents, self.closed_bytes
            for uid in self.open:
                received, uploaded = self.pending[uid]
                documents += max(0, received.documents - uploaded)
                size += received.bytes
            oldest = self.pending[next(iter(self.pending))][0].first_received if self.pending else None
            return len(self.pending), documents, size, oldest

    def _check(self, uid: str) -> None:
        """Read one run's ``uploaded.json``: forget it if finished, else update what Tiled has."""
        directory = self.spool.runs_dir / uid
        uploaded = Uploaded.load(directory)
        entry = self.pending[uid]
        closed = uid not in self.open
        if closed:
            self._count(entry, -1)
        if uploaded.state.finished or not directory.is_dir():
            del self.pending[uid]
            self.open.discard(uid)
            return
        entry[1] = uploaded.documents
        if closed:
            self._count(entry, 1)

    def newest(self) -> list[RunView]:
        """The `RECENT_RUNS` newest runs as `status` shows them (those still in the spool)."""
        with self.lock:
            uids = list(self.recent)
        views = []
        for uid in uids:
            directory: Path = self.spool.runs_dir / uid
            received = Received.load(directory)
            if received is not None:
                views.append(RunView(directory, received, Uploaded.load(directory)))
        return views
