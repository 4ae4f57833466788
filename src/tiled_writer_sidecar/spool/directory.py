"""The spool directory: layout, permissions, locks, quarantine.

::

    SPOOL/
      receiver.lock  uploader.lock   flock'd by the one receiver / one uploader
      runs/<run uid>/                one directory per run (see index.py)
          0000000000.seg …           the run's log (see segment.py)
          received.json uploaded.json
      quarantine/                    rejected messages, kept for inspection

The directory is created 0700 and refused if group or others may write to
it. Lock files are opened without following a symlink (and refused unless
they are regular files with one link); run directories that are symlinks
are skipped (never listed, read or counted).

The quarantine keeps the newest rejected messages within
``quarantine_max_bytes`` and `QUARANTINE_MAX_FILES`; a message longer than
`QUARANTINE_PREFIX` is kept as a one-line header (its full length and
sha256) and its first `QUARANTINE_PREFIX` bytes. Its bytes count in
`total_bytes` (so in ``max_bytes`` and ``/healthz``). A run's segments are deleted once Tiled has the
whole run (or after ``retention_hours``); its two small JSON files stay for the last
``HISTORY_RUNS`` runs so `status` can show what was uploaded. `release_run` costs O(1) per run:
the runs are listed once per process (one stat each), then kept in memory (`_history`).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import threading
import time
from pathlib import Path

from tiled_writer_sidecar.errors import SpoolError, SpoolLockedError, UnsafeName
from tiled_writer_sidecar.spool.segment import list_segments, log_bytes
from tiled_writer_sidecar.spool.state_files import (
    UPLOADED,
    Received,
    RunView,
    Uploaded,
    UploadState,
)
from tiled_writer_sidecar.text import ascii_text

HISTORY_RUNS = 200
QUARANTINE_MAX_FILES = 1000
QUARANTINE_MAX_BYTES = 64 * 2**20
QUARANTINE_PREFIX = 64 * 2**10
_SAFE_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def is_safe_uid(uid: object) -> bool:
    """The one rule for a run uid: what bluesky writes (uuid4) and more, never a separator, a dot
    segment or a newline (a full match), so it is both a directory name and a Tiled key."""
    return isinstance(uid, str) and _SAFE_UID.fullmatch(uid) is not None and ".." not in uid


def check_uid(uid: object) -> str:
    """`uid` if `is_safe_uid`; else raise `UnsafeName` (its reason shows the uid escaped and bounded)."""
    if not isinstance(uid, str) or not is_safe_uid(uid):
        raise UnsafeName(f"run uid {ascii_text(ascii(uid), 80)} is not a safe Tiled key")
    return uid


def quarantine_entry(payload: bytes) -> bytes:
    """What the quarantine keeps of a message: all of it, or a header line and its first bytes."""
    if len(payload) <= QUARANTINE_PREFIX:
        return payload
    digest = hashlib.sha256(payload).hexdigest()
    header = f"tiled-writer-sidecar quarantine prefix: length={len(payload)} sha256={digest} kept={QUARANTINE_PREFIX}\n"
    return header.encode() + payload[:QUARANTINE_PREFIX]


class SpoolDir:
    def __init__(
        self, root: Path, *, create: bool = True, quarantine_max_bytes: int = QUARANTINE_MAX_BYTES
    ) -> None:
        self.root = root
        #: Bytes the quarantine may hold (0 keeps nothing); may be set after construction.
        self.quarantine_max_bytes = quarantine_max_bytes
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
        self._quarantined: collections.deque[tuple[str, int]] | None = None  # (name, size), oldest first
        self._quarantine_bytes = 0
        self._history: collections.deque[Path] | None = None  # finished runs, oldest first
        self._history_lock = threading.Lock()  # release_run is called from the uploader's workers

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

    def _open_lock(self, role: str, flags: int) -> int:
        """The `role` lock file, never through a symlink; SpoolError if it is not a plain file."""
        path = self.root / f"{role}.lock"
        try:
            fd = os.open(path, flags | _NOFOLLOW, 0o600)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENXIO):
                raise SpoolError(f"{path} is a symlink or not a regular file; remove it") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise SpoolError(f"{path} is not a regular file with one link; remove it")
        return fd

    def lock(self, role: str) -> None:
        """Take the `role` lock (receiver or uploader) for this process's lifetime."""
        fd = self._open_lock(role, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            except OSError:
                holder = "another process"
            os.close(fd)
            raise SpoolLockedError(
                f"spool {self.root} is locked: its {role} is already running (pid {holder[:20]!r})"
            ) from None
        try:  # the pid is only for the message above; the flock is the lock
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass
        self._locks.append(fd)

    def is_locked(self, role: str) -> bool:
        """True if some process holds the `role` lock."""
        try:
            fd = self._open_lock(role, os.O_RDONLY)
        except FileNotFoundError:
            return False
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

    def run_listing(self) -> tuple[list[os.DirEntry[str]], list[str]]:
        """The one listing of runs/: its run directories as entries (no `Path` each: 50,000 of them
        cost seconds), and the names of its symlinks (never followed, never read; `verify` reports
        them). Files and unreadable entries are in neither."""
        dirs, links = [], []
        try:
            entries = list(os.scandir(self.runs_dir))
        except OSError:
            return [], []
        for entry in entries:
            try:
                if entry.is_symlink():
                    links.append(entry.name)
                elif entry.is_dir(follow_symlinks=False):
                    dirs.append(entry)
            except OSError:
                continue
        return dirs, links

    def run_dirs(self) -> list[Path]:
        """The run directories (`run_listing`: never a symlink, never a file)."""
        return [Path(entry.path) for entry in self.run_entries()]

    def run_entries(self) -> list[os.DirEntry[str]]:
        """`run_dirs` as directory entries."""
        return self.run_listing()[0]

    def run_names(self) -> list[str]:
        """The names of the run directories (`run_dirs`: never a symlink, never a file)."""
        return [d.name for d in self.run_dirs()]

    def runs(self) -> list[RunView]:
        """Every run in the spool, oldest first."""
        views = []
        for run_dir in self.run_dirs():
            received = Received.load(run_dir)
            if received is None:
                continue
            views.append(RunView(run_dir, received, Uploaded.load(run_dir)))
        views.sort(key=lambda v: (v.received.first_received, v.uid))
        return views

    def total_bytes(self) -> int:
        """Bytes of every run's log and of the quarantine."""
        return sum(log_bytes(d) for d in self.run_dirs()) + self.quarantine_bytes()

    def quarantine_bytes(self) -> int:
        return sum(size for _, size in self._quarantine_listing())

    def segment_count(self) -> int:
        return sum(len(list_segments(d)) for d in self.run_dirs())

    def release_run(self, view: RunView, retention_hours: float) -> None:
        """Delete a fully uploaded run's segments (after retention); prune history."""
        age_h = (time.time() - view.uploaded.updated) / 3600
        if age_h >= retention_hours:
            for segment in list_segments(view.directory):
                segment.unlink(missing_ok=True)
        with self._history_lock:
            if self._history is None:  # once per process: the runs with an uploaded.json, by its mtime
                self._history = collections.deque(self._uploaded_by_age(exclude=view.directory))
            self._history.append(view.directory)
            while len(self._history) > HISTORY_RUNS:
                old = self._history.popleft()  # a quarantined run, or one with segments, stays on disk
                if Uploaded.load(old).state == UploadState.UPLOADED and not list_segments(old):
                    shutil.rmtree(old, ignore_errors=True)

    def _uploaded_by_age(self, exclude: Path) -> list[Path]:
        """Run directories holding an uploaded.json, oldest write first (one stat each, no read)."""
        dated = []
        for entry in self.run_entries():
            try:
                mtime = os.stat(os.path.join(entry.path, UPLOADED), follow_symlinks=False).st_mtime_ns
            except OSError:
                continue
            dated.append((mtime, entry.path))
        dated.sort()
        return [Path(path) for _, path in dated if path != str(exclude)]

    def _quarantine_listing(self) -> list[tuple[str, int]]:
        """``(name, size)`` of each file in quarantine/, oldest first."""
        listing = []
        try:
            entries = list(os.scandir(self.quarantine_dir))
        except OSError:
            return []
        for entry in entries:
            try:
                listing.append((entry.name, entry.stat(follow_symlinks=False).st_size))
            except OSError:
                continue
        listing.sort()
        return listing

    def quarantine(self, reason: str, payload: bytes) -> Path | None:
        """Keep a rejected message for inspection, within the quarantine's bounds (module docstring)."""
        entry = quarantine_entry(payload)
        limit = self.quarantine_max_bytes
        if len(entry) > limit:
            return None
        if self._quarantined is None:
            self._quarantined = collections.deque(self._quarantine_listing())
            self._quarantine_bytes = sum(size for _, size in self._quarantined)
        kept = self._quarantined
        while kept and (len(kept) >= QUARANTINE_MAX_FILES or self._quarantine_bytes + len(entry) > limit):
            name, size = kept.popleft()
            self._quarantine_bytes -= size
            try:
                os.unlink(self.quarantine_dir / name)
            except OSError:
                pass
        safe_reason = re.sub(r"[^a-z0-9-]", "_", reason.lower())[:40]
        suffix = ".prefix.bin" if len(entry) != len(payload) else ".bin"
        path = self.quarantine_dir / f"{time.time_ns():020d}-{safe_reason}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        except OSError:
            return None
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            path.unlink(missing_ok=True)  # ours (O_EXCL): no half entry is kept
            return None
        finally:
            os.close(fd)
        kept.append((path.name, len(entry)))
        self._quarantine_bytes += len(entry)
        return path
