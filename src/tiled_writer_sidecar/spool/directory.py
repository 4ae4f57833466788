"""The spool directory: layout, permissions, locks, quarantine.

::

    SPOOL/
      receiver.lock  uploader.lock   flock'd by the one receiver / one uploader
      runs/<run uid>/                one directory per run (see index.py)
          0000000000.seg …           the run's log (see segment.py)
          received.json uploaded.json
      quarantine/                    rejected messages, kept for inspection

The directory is created 0700 and refused if group or others may write to
it. A run's segments are deleted once Tiled has the whole run (or after
``retention_hours``); its two small JSON files stay for the last
``HISTORY_RUNS`` runs so `status` can show what was uploaded.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import time
from pathlib import Path

from ..errors import SpoolError, SpoolLockedError
from .index import Received, RunView, Uploaded
from .segment import list_segments, log_bytes

HISTORY_RUNS = 200
QUARANTINE_MAX_FILES = 1000
_SAFE_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def is_safe_uid(uid: object) -> bool:
    """A uid we can use as a directory name (no separators, no traversal)."""
    return isinstance(uid, str) and bool(_SAFE_UID.match(uid)) and ".." not in uid


class SpoolDir:
    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = root
        try:
            if create:
                root.mkdir(mode=0o700, parents=True, exist_ok=True)
            elif not (root / "runs").is_dir():
                raise SpoolError(f"{root} is not a spool directory (no runs/ inside)")
            # Refuse before writing anything into a directory others may tamper with.
            if root.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise SpoolError(
                    f"spool directory {root} is writable by group or others; run: chmod 700 {root}"
                )
            if create:
                (root / "runs").mkdir(mode=0o700, exist_ok=True)
                (root / "quarantine").mkdir(mode=0o700, exist_ok=True)
        except OSError as err:
            raise SpoolError(f"cannot create spool directory {root}: {err.strerror}") from None
        self._locks: list[int] = []
        self._quarantined: int | None = None  # files in quarantine/, counted lazily

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    def run_dir(self, uid: str) -> Path:
        if not is_safe_uid(uid):
            raise ValueError(f"unsafe run uid {uid!r}")
        return self.runs_dir / uid

    def lock(self, role: str) -> None:
        """Take the `role` lock (receiver or uploader) for this process's lifetime."""
        path = self.root / f"{role}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SpoolLockedError(
                f"spool {self.root} is locked: its {role} is already running (pid {holder})"
            ) from None
        try:  # the pid is only for the message above; the flock is the lock
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass
        self._locks.append(fd)

    def is_locked(self, role: str) -> bool:
        """True if some process holds the `role` lock."""
        path = self.root / f"{role}.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def unlock(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()

    def runs(self) -> list[RunView]:
        """Every run in the spool, oldest first."""
        views = []
        for run_dir in self.runs_dir.iterdir():
            received = Received.load(run_dir)
            if received is None:
                continue
            views.append(RunView(run_dir, received, Uploaded.load(run_dir)))
        views.sort(key=lambda v: (v.received.first_received, v.uid))
        return views

    def total_bytes(self) -> int:
        return sum(log_bytes(d) for d in self.runs_dir.iterdir() if d.is_dir())

    def segment_count(self) -> int:
        return sum(len(list_segments(d)) for d in self.runs_dir.iterdir() if d.is_dir())

    def release_run(self, view: RunView, retention_hours: float) -> None:
        """Delete a fully uploaded run's segments (after retention); prune history."""
        age_h = (time.time() - view.uploaded.updated) / 3600
        if age_h >= retention_hours:
            for segment in list_segments(view.directory):
                segment.unlink(missing_ok=True)
        done = [v for v in self.runs() if v.uploaded.state in ("uploaded", "quarantined")]
        for old in done[: max(0, len(done) - HISTORY_RUNS)]:
            if old.uploaded.state == "uploaded" and not list_segments(old.directory):
                shutil.rmtree(old.directory, ignore_errors=True)

    def quarantine(self, reason: str, payload: bytes) -> Path | None:
        """Keep a rejected message for inspection (the newest QUARANTINE_MAX_FILES)."""
        if self._quarantined is None or self._quarantined >= QUARANTINE_MAX_FILES:
            existing = sorted(self.quarantine_dir.iterdir())
            for old in existing[: max(0, len(existing) - QUARANTINE_MAX_FILES // 2)]:
                old.unlink(missing_ok=True)
            self._quarantined = min(len(existing), QUARANTINE_MAX_FILES // 2)
        self._quarantined += 1
        safe_reason = re.sub(r"[^a-z0-9-]", "_", reason.lower())[:40]
        path = self.quarantine_dir / f"{time.time_ns():020d}-{safe_reason}.bin"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)
        except OSError:
            return None
        return path
