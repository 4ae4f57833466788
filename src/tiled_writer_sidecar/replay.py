"""`replay` and `import-backup`: upload what a spool holds, by hand, then exit.

`replay` takes the spool's uploader lock (so it can never upload a run the
daemon is uploading), closes runs whose stop never came if no receiver is
running, and uploads the selected runs (all by default) with the same
uploader the daemon uses: exactly once, verified row by row. ``--dry-run``
lists what would be uploaded; ``--watch`` keeps uploading as new runs
appear (woken by watchfiles).

`import-backup` reads the JSON Lines files in-process TiledWriter writes to
its ``backup_directory`` after a failure, spools them as runs marked for
rewrite (Tiled may hold a partial copy from the failed attempt, which is
deleted first), then uploads them like `replay`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .config import Config
from .errors import RejectedMessage, SidecarError, TiledUnavailableError
from .receiver import Receiver
from .spool.directory import SpoolDir
from .spool.index import RunView, Uploaded, UploadState
from .stats import ReceiverStats
from .uploader import Uploader

log = logging.getLogger(__name__)


def close_abandoned_runs(spool: SpoolDir) -> list[str]:
    """Close runs still open with no receiver running: their stop will never come."""
    if spool.is_locked("receiver"):
        return []
    closed = []
    for view in spool.runs():
        if not view.received.closed:
            view.received.closed = True
            view.received.close_reason = "closed by replay; no receiver was running"
            view.received.save(view.directory)
            closed.append(view.uid)
    return closed


def selected_runs(spool: SpoolDir, uids: list[str]) -> list[RunView]:
    runs = spool.runs()
    if not uids:
        return [r for r in runs if not r.uploaded.state.finished]
    by_uid = {r.uid: r for r in runs}
    missing = [u for u in uids if u not in by_uid]
    if missing:
        raise SidecarError(f"not in spool {spool.root}: {', '.join(missing)}")
    return [by_uid[u] for u in uids]


def replay(
    config: Config,
    uids: list[str],
    *,
    dry_run: bool = False,
    watch: bool = False,
    console: Console | None = None,
    give_up_after: float = 60.0,
) -> int:
    console = console or Console(stderr=True)
    spool = SpoolDir(config.spool_dir, create=False)
    if dry_run:
        runs = selected_runs(spool, uids)
        for view in runs:
            console.print(
                f"would upload {view.uid} scan_id={view.received.scan_id} "
                f"documents={view.received.documents} state={view.state}"
            )
        console.print(f"{len(runs)} run(s) would be uploaded (dry run: nothing was changed)")
        return 0
    spool.lock("uploader")
    if warning := config.insecure_transport_warning():
        log.warning("%s", warning)
    for uid in close_abandoned_runs(spool):
        console.print(f"run {uid}: closed; its stop never arrived")
    runs = selected_runs(spool, uids)
    only = {r.uid for r in runs} if uids else None
    total = sum(r.received.documents for r in runs)
    console.print(f"uploading {len(runs)} run(s), {total} documents, to {config.tiled.uri}")
    stop = threading.Event()
    uploader = Uploader(config, spool, only=only, stop=stop, give_up_after=None if watch else give_up_after)
    started = time.monotonic()
    watcher = _start_watcher(spool, uploader) if watch else None
    try:
        uploader.run(until_idle=not watch)
    except TiledUnavailableError as err:
        left = [r.uid for r in spool.runs() if not r.uploaded.state.finished]
        raise TiledUnavailableError(f"{err}; {len(left)} run(s) remain in the spool") from None
    except KeyboardInterrupt:
        stop.set()
        console.print("interrupted; what was not uploaded stays in the spool")
        return 130
    finally:
        if watcher is not None:
            stop.set()
    elapsed = time.monotonic() - started
    done = [r for r in spool.runs() if (only is None or r.uid in only)]
    quarantined = [r for r in done if r.uploaded.state == UploadState.QUARANTINED]
    console.print(
        f"done in {elapsed:.1f} s: {uploader.status.runs_uploaded} run(s) uploaded, "
        f"{uploader.status.documents} documents, {uploader.status.rows} rows"
        + (f"; {len(quarantined)} quarantined (see status)" if quarantined else "")
    )
    return 1 if quarantined else 0


def _start_watcher(spool: SpoolDir, uploader: Uploader) -> threading.Thread:
    """Wake the uploader when files change in the spool (instead of polling)."""
    from watchfiles import watch

    def loop() -> None:
        for _changes in watch(
            spool.runs_dir, stop_event=uploader.stop_event, rust_timeout=1000, yield_on_timeout=True
        ):
            uploader.wake.set()

    thread = threading.Thread(target=loop, name="watch", daemon=True)
    thread.start()
    return thread


def read_backup(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The (name, doc) pairs of one TiledWriter JSON Lines (or JSON array) backup."""
    try:
        text = path.read_text()
    except OSError as err:
        raise SidecarError(f"cannot read backup {path}: {err.strerror}") from None
    documents: list[tuple[str, dict[str, Any]]] = []
    try:
        if text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as err:
        raise SidecarError(f"{path} is not a TiledWriter backup (JSON Lines): {err}") from None
    for n, item in enumerate(items, 1):
        if not (
            isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("doc"), dict)
        ):
            raise SidecarError(f"{path}: entry {n} is not {{'name': ..., 'doc': {{...}}}}")
        documents.append((item["name"], item["doc"]))
    return documents


def import_backup(config: Config, paths: list[Path], console: Console | None = None) -> int:
    console = console or Console(stderr=True)
    spool = SpoolDir(config.spool_dir)
    spool.lock("uploader")
    receiver = Receiver(config, spool, ReceiverStats(), subscribe=False)
    imported: list[str] = []
    try:
        for path in paths:
            documents = read_backup(path)
            for n, (name, doc) in enumerate(documents, 1):
                try:
                    receiver.accept(name, doc)
                except RejectedMessage as err:
                    raise SidecarError(f"{path}: document {n} ({name}) rejected: {err}") from None
            new = [doc["uid"] for name, doc in documents if name == "start"]
            for uid in new:
                # A backup exists because a write failed: whatever Tiled holds is partial.
                uploaded = Uploaded(state=UploadState.UPLOADING)
                uploaded.save(spool.run_dir(uid))
            imported += new
            console.print(f"{path}: {len(documents)} documents, run(s) {', '.join(new) or '-'}")
        receiver.close_open_runs("the backup file ends without a stop")
    finally:
        receiver.close()
    spool.unlock()
    return replay(config, imported) if imported else 0
