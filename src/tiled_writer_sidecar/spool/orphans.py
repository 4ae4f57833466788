"""Orphans: the documents of runs whose start never reached the sidecar (issue 21).

They are kept, not dropped, apart from the runs the uploader sees::

    SPOOL/orphans/run_start/<uid>/    descriptors, resources, events, a stop naming run <uid>
    SPOOL/orphans/descriptor/<uid>/   events of descriptor <uid>, itself not (yet) seen

Each holds a log and a ``received.json`` (``start_missing``), like a run
directory (`spool.state_files`). The uploader reads only ``runs/``, so an orphan is
never uploaded. When its start (or its descriptor) arrives, the receiver
feeds the orphan's documents to the run after it, in their order, and
deletes the directory (`ingest.Ingest`): the run is then complete and uploads
normally. Orphans are untrusted input like any other: at most `MAX_ORPHANS`
of them and `ORPHAN_MAX_BYTES` in all; beyond, documents are rejected
(``orphans-full``) and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiled_writer_sidecar.spool.directory import SpoolDir, is_safe_uid
from tiled_writer_sidecar.spool.state_files import Received

ORPHANS = "orphans"
KINDS = ("run_start", "descriptor")
MAX_ORPHANS = 1000
ORPHAN_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Orphan:
    kind: str
    directory: Path
    received: Received

    def as_dict(self) -> dict[str, Any]:
        """What ``status --json`` lists of an orphan."""
        r = self.received
        return {
            "uid": r.uid,
            "keyed_by": self.kind,
            "state": "start-missing",
            "documents": r.documents,
            "bytes": r.bytes,
            "events": r.events,
            "gaps": r.gaps(),
            "stop_received": r.stop_received,
            "first_received": r.first_received,
            "last_received": r.last_received,
        }


def orphan_dir(spool: SpoolDir, kind: str, uid: str, *, create: bool = False) -> Path:
    """The directory of the orphan keyed by `kind` and `uid` (with `create`, its parents are made)."""
    if kind not in KINDS or not is_safe_uid(uid):
        raise ValueError(f"unsafe orphan {kind}:{uid!r}")
    parent = spool.root / ORPHANS / kind
    if create:
        for directory in (spool.root / ORPHANS, parent):
            directory.mkdir(mode=0o700, exist_ok=True)
            if directory.is_symlink():
                raise OSError(f"{directory} is a symlink")
    return parent / uid


def orphans(spool: SpoolDir) -> list[Orphan]:
    """Every orphan in the spool, oldest first (symlinks and unreadable ones skipped)."""
    found = []
    for kind in KINDS:
        try:
            entries = list(os.scandir(spool.root / ORPHANS / kind))
        except OSError:
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            received = Received.load(Path(entry.path))
            if received is not None and is_safe_uid(received.uid):
                found.append(Orphan(kind, Path(entry.path), received))
    found.sort(key=lambda o: (o.received.first_received, o.kind, o.received.uid))
    return found


def orphan_report(spool: SpoolDir) -> dict[str, Any]:
    """``status``'s orphan section: each orphan, and the runs and documents they hold."""
    listed = [orphan.as_dict() for orphan in orphans(spool)]
    return {
        "runs": listed,
        "start_missing_runs": len(listed),
        "start_missing_documents": sum(o["documents"] for o in listed),
    }
