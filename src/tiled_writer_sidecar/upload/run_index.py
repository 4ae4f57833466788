"""The uploader's index of the spool's runs, in memory, refreshed incrementally.

Scheduling costs O(log N) per run, not a pass over the spool:

- The run directories' names are listed (`SpoolDir.run_entries`: no symlink)
  only when ``runs/`` changed (its mtime and link count) or every
  `FULL_LISTING_S`, never more often than every `LISTING_INTERVAL_S`; a new
  name's two JSON files are read once.
- New names are indexed in bounded chunks (at most `INDEX_CHUNK` names or,
  beyond `INDEX_MIN`, `INDEX_BUDGET_S` per refresh), so a spool of 50,000 runs starts uploading
  at once: the names wait in a queue ordered by their directory's mtime (a
  lstat, no file read), taken from both ends: the oldest (the backlog's
  head: oldest-first is kept while the rest is indexed) and a few newest
  (`NEWEST_PER_REFRESH`: the run being acquired, for the live lane).
- Closed runs wait in a heap, oldest first (``first_received``, then uid);
  their files are read again only when one is taken (`next_closed`).
- Open runs (the live lane) are kept with the stat of their
  ``received.json``; a run put back by the scheduler while idle (parked) is
  offered again only when that file changes. Open runs are re-stat'ed on
  each refresh, closed ones never.
- A run backing off waits in a second heap until its not-before time.
- ``done`` holds the runs seen finished (or unreadable): never looked at
  again; names that disappear from ``runs/`` are forgotten.

Every file read here is untrusted: an unreadable run is logged once and
put in ``done``.
"""

from __future__ import annotations

import collections
import heapq
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import (
    RECEIVED,
    Received,
    RunView,
    Uploaded,
    UploadState,
)
from tiled_writer_sidecar.text import clean
from tiled_writer_sidecar.upload.policy import one_line

log = logging.getLogger(__name__)

LISTING_INTERVAL_S = 0.2  # at most this often is runs/ listed
FULL_LISTING_S = 5.0  # listed at least this often, changed or not (a missed mtime tick)
INDEX_CHUNK = 2000  # new names indexed per refresh at most (their files read) ...
INDEX_BUDGET_S = 0.1  # ... and for at most this long once INDEX_MIN are read
INDEX_MIN = 64
NEWEST_PER_REFRESH = 16  # of those, taken from the newest end (the live run, when a backlog waits)

StatKey = tuple[int, int, int] | None


@dataclass
class OpenRun:
    """An open run not in flight: its age, the stat of its received.json, whether it was parked."""

    age: tuple[float, str]
    key: StatKey
    parked: bool = False


def _stat_key(path: Path) -> StatKey:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _mtime_ns(entry: os.DirEntry[str]) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_mtime_ns
    except OSError:
        return 0


def age_of(received: Received, uid: str) -> tuple[float, str]:
    """Sort key: oldest first (a hostile received.json may hold anything there)."""
    first = received.first_received
    return (float(first) if isinstance(first, (int, float)) else 0.0, uid)


class RunIndex:
    """Runs to upload, by lane; see the module docstring."""

    def __init__(self, spool: SpoolDir, only: set[str] | None = None) -> None:
        self.spool = spool
        self.only = only
        self.known: set[str] = set()  # every name seen in runs/
        self.done: set[str] = set()  # finished, quarantined or unreadable: never candidates again
        self.closed: list[tuple[float, str]] = []  # heap of (first_received, uid)
        self.open: dict[str, OpenRun] = {}
        self.delayed: list[tuple[float, str]] = []  # heap of (not before, monotonic; uid)
        self.out: set[str] = set()  # in flight or backing off: in no queue
        self.unindexed: collections.deque[str] = collections.deque()  # listed, not read: oldest first
        self._listing_key: StatKey = None
        self._listed_at = -1e9
        self._full_at = -1e9

    # ------------------------------------------------------------- refresh
    def refresh(self) -> None:
        """List new run directories if runs/ changed; re-stat open runs; release due backoffs."""
        now = time.monotonic()
        if now - self._listed_at >= LISTING_INTERVAL_S:
            key = _stat_key(self.spool.runs_dir)
            if key != self._listing_key or now - self._full_at >= FULL_LISTING_S:
                self._listing_key = key
                self._full_at = now
                self._list()
            self._listed_at = now
        self._index_some()
        for uid, entry in list(self.open.items()):
            key = _stat_key(self.spool.runs_dir / uid / RECEIVED)
            if key != entry.key:
                del self.open[uid]
                self._enqueue(uid)
        while self.delayed and self.delayed[0][0] <= now:
            _, uid = heapq.heappop(self.delayed)
            self.out.discard(uid)
            self._enqueue(uid)

    def _list(self) -> None:
        entries = {entry.name: entry for entry in self.spool.run_entries()}
        names = set(entries)
        if self.only is not None:
            names &= self.only
        for uid in self.known - names:  # pruned from the spool
            self.known.discard(uid)
            self.done.discard(uid)
            self.open.pop(uid, None)
        new = names - self.known
        self.known |= new
        self.unindexed.extend(
            sorted(new, key=lambda uid: (_mtime_ns(entries[uid]), uid))
        )  # newer than all queued

    def _index_some(self) -> None:
        """Read a bounded chunk of listed names: a few newest, then the oldest, until the budget is spent."""
        queue = self.unindexed
        deadline = time.monotonic() + INDEX_BUDGET_S
        for n in range(min(INDEX_CHUNK, len(queue))):
            newest = n % 2 == 1 and n < 2 * NEWEST_PER_REFRESH
            uid = queue.pop() if newest else queue.popleft()
            if uid in self.known:  # else pruned meanwhile
                self._enqueue(uid)
            if n + 1 >= INDEX_MIN and time.monotonic() >= deadline:
                break

    def _enqueue(self, uid: str) -> None:
        """Read a run's files and put it in its lane (or in ``done``)."""
        if uid in self.done or uid in self.out:
            return
        view = self.load(uid)
        if view is None:
            if uid not in self.done:  # received.json not written yet (the run was just made): list it again
                self.known.discard(uid)
            return
        if not view.received.closed:
            self.open[uid] = OpenRun(age_of(view.received, uid), _stat_key(view.directory / RECEIVED))
        else:
            heapq.heappush(self.closed, age_of(view.received, uid))

    def load(self, uid: str) -> RunView | None:
        """The run's view if it is still to be uploaded; None (and in ``done``) otherwise."""
        directory = self.spool.runs_dir / uid
        try:
            key = _stat_key(directory / RECEIVED)
            received = Received.load(directory)
            if received is None:
                if key is not None:  # there but unusable; a missing one may still be written
                    raise ValueError("received.json has no usable uid")
                return None
            view = RunView(directory, received, Uploaded.load(directory))
        except (OSError, TypeError, ValueError) as err:
            log.warning("run directory %s: unreadable (%s); skipped", clean(uid), one_line(err))
            self.done.add(uid)
            return None
        state = view.uploaded.state
        wanted = state != UploadState.UPLOADED if self.only is not None else not state.finished
        if not wanted:
            self.done.add(uid)
            return None
        return view

    # ------------------------------------------------------------- taking runs
    def live(self) -> list[RunView]:
        """The open runs to activate (not parked, or changed since), oldest first; they leave the index."""
        taken = []
        for uid, entry in sorted(self.open.items(), key=lambda item: item[1].age):
            if entry.parked:
                continue
            del self.open[uid]
            view = self.load(uid)
            if view is None:
                continue
            self.out.add(uid)
            taken.append(view)
        return taken

    def next_closed(self) -> RunView | None:
        """The oldest closed run still to upload (it leaves the index), or None."""
        while self.closed:
            _, uid = heapq.heappop(self.closed)
            if uid in self.out or uid in self.done:
                continue
            view = self.load(uid)
            if view is None:
                continue
            self.out.add(uid)
            return view
        return None

    # ------------------------------------------------------------- giving runs back
    def finished(self, uid: str) -> None:
        self.out.discard(uid)
        self.done.add(uid)

    def later(self, uid: str, not_before: float) -> None:
        """The run backs off: offered again at `not_before` (monotonic)."""
        self.out.add(uid)
        heapq.heappush(self.delayed, (not_before, uid))

    def again(self, uid: str) -> None:
        """The run is given back now (a Tiled-wide pause: it is retried with everyone)."""
        self.out.discard(uid)
        self._enqueue(uid)

    def park(self, uid: str, received_dir: Path, age: tuple[float, str]) -> None:
        """An idle open run leaves memory: offered again once its received.json changes."""
        self.out.discard(uid)
        self.open[uid] = OpenRun(age, _stat_key(received_dir / RECEIVED), parked=True)

    # ------------------------------------------------------------- counts
    @property
    def parked(self) -> dict[str, OpenRun]:
        return {uid: entry for uid, entry in self.open.items() if entry.parked}

    def waiting(self) -> int:
        """Runs in a queue or backing off, or not indexed yet (not those in flight)."""
        return len(self.closed) + len(self.open) + len(self.delayed) + len(self.unindexed)

    @property
    def indexing(self) -> bool:
        """Listed names are still to be read (the next refresh reads more)."""
        return bool(self.unindexed)

    def work_left(self) -> bool:
        return bool(
            self.unindexed or self.closed or self.delayed or any(not e.parked for e in self.open.values())
        )
