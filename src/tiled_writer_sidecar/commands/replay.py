"""`replay` and `import-backup`: upload what a spool holds, by hand, then exit.

- `replay` takes the uploader lock, closes the runs left open when no receiver
  runs (`Ingest.recover`: their logs replayed, their stop never comes) and
  uploads the selected runs with the daemon's `Uploader`. ``--dry-run`` lists
  them on stdout, one line each, saying which would DELETE a run in Tiled and
  rewrite it (it asks Tiled which exist); ``--watch`` keeps uploading as runs appear.
- Neither deletes nor overwrites a run in Tiled that this spool did not create
  (``uploaded.created``): such a run is quarantined, unless
  ``--overwrite-foreign`` says to replace it.
- `import-backup` feeds TiledWriter's JSON Lines backups through `Ingest`, as
  the receiver feeds the wire, marks their runs ``pending`` (the rule above
  applies: a copy in Tiled written by another writer is not replaced) and
  replays them. A backup file is untrusted: an entry that is
  not JSON, not ``{"name": ..., "doc": {...}}`` or rejected by `Ingest` is
  skipped and counted per reason (exit 1), never raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console

from tiled_writer_sidecar.config import Config, SpoolConfig
from tiled_writer_sidecar.documents.wire import loads_json_checked
from tiled_writer_sidecar.errors import (
    DecodeError,
    RejectedMessage,
    SidecarError,
    TiledUnavailableError,
)
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.ingest import Ingest
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import RunView, Uploaded, UploadState
from tiled_writer_sidecar.states import Rejection
from tiled_writer_sidecar.text import clean
from tiled_writer_sidecar.upload.policy import one_line
from tiled_writer_sidecar.upload.scheduler import Uploader

log = logging.getLogger(__name__)

ABANDONED = "closed by replay; no receiver was running"
NO_STOP = "the backup file ends without a stop"
PROGRESS_S = 10.0  # long work says how far it got this often

#: A backup entry: a (name, doc) pair, or why it is not one.
Entry = tuple[str, dict[str, Any]] | RejectedMessage


def close_abandoned_runs(spool: SpoolDir, config: SpoolConfig | None = None) -> list[tuple[str, str]]:
    """Close the runs left open if no receiver is running (their stop will never come): (uid, reason) each."""
    if spool.is_locked("receiver"):
        return []
    ingest = Ingest(config or SpoolConfig(), spool, ReceiverStats())
    try:
        return ingest.recover(close_reason=ABANDONED)
    finally:
        ingest.shutdown()


def selected_runs(spool: SpoolDir, uids: list[str]) -> list[RunView]:
    runs = spool.runs()
    if not uids:
        return [r for r in runs if not r.uploaded.state.finished]
    by_uid = {r.uid: r for r in runs}
    missing = [u for u in uids if u not in by_uid]
    if missing:
        raise SidecarError(f"not in spool {spool.root}: {', '.join(missing)}")
    return [by_uid[u] for u in uids]


def _say(console: Console, line: str) -> None:
    """One line on the console, shown as it is (no markup, control characters escaped)."""
    console.print(clean(line, 2000), markup=False, highlight=False, soft_wrap=True)


def in_tiled(config: Config, uids: list[str]) -> set[str] | None:
    """Which of `uids` Tiled holds (None if Tiled cannot be asked): one read-only GET per run.

    Plain HTTP with the API key, never a Tiled client: without a key, a client may prompt to log in.
    """
    import httpx

    from tiled_writer_sidecar.spool.directory import check_uid
    from tiled_writer_sidecar.upload.tiled_calls import url_path

    uri = config.tiled.uri.rstrip("/")
    base = uri if "/api/v1/metadata" in uri else f"{uri}/api/v1/metadata"
    key = config.api_key()
    headers = {"Authorization": f"Apikey {key}"} if key else {}
    found = set()
    try:
        with httpx.Client(timeout=config.tiled.timeout_seconds, headers=headers) as http:
            for uid in uids:
                response = http.get(f"{base}/{url_path(check_uid(uid))}")
                if response.status_code == 404:
                    continue
                response.raise_for_status()
                found.add(uid)
    except Exception as err:  # noqa: BLE001 - the dry run says it could not ask, in one line
        log.warning("dry run: cannot ask Tiled which runs exist: %s", one_line(err))
        return None
    return found


def dry_run_line(view: RunView, exists: bool | None, overwrite_foreign: bool) -> str:
    """What `replay` would do to one run, as the dry run says it."""
    what = (
        f"{view.uid} scan_id={view.received.scan_id} documents={view.received.documents} state={view.state}"
    )
    ours = view.uploaded.created
    if exists is None:
        if ours or overwrite_foreign:
            return f"would upload {what}; would DELETE the run in Tiled and rewrite it, if Tiled holds it"
        return f"would upload {what}; quarantined instead if Tiled holds it (not created by this spool)"
    if not exists:
        return f"would upload {what}"
    if ours:
        return f"would DELETE the run in Tiled and rewrite it: {what} (created by this spool)"
    if overwrite_foreign:
        return f"would DELETE the run in Tiled and rewrite it: {what} (NOT created by this spool)"
    return (
        f"would NOT upload {what}: Tiled holds a run with this uid that this spool did not create"
        " (it would be quarantined; --overwrite-foreign would DELETE it and rewrite it)"
    )


def list_runs(
    config: Config, spool: SpoolDir, uids: list[str], console: Console, *, overwrite_foreign: bool = False
) -> int:
    """`replay --dry-run`: what would be uploaded or deleted, one line per run on stdout; nothing changes."""
    runs = selected_runs(spool, uids)
    existing = in_tiled(config, [view.uid for view in runs])
    out = Console(soft_wrap=True)
    for view in runs:
        exists = None if existing is None else view.uid in existing
        _say(out, dry_run_line(view, exists, overwrite_foreign))
    _say(out, f"{len(runs)} run(s) would be uploaded (dry run: nothing was changed)")
    return 0


def _closed_line(uid: str, reason: str) -> str:
    if reason == ABANDONED:
        return f"run {uid}: closed; its stop never arrived"
    if reason == "stop":
        return f"run {uid}: closed; its stop was in its log"
    return f"run {uid}: closed; {reason}"


def replay(
    config: Config,
    uids: list[str],
    *,
    dry_run: bool = False,
    watch: bool = False,
    console: Console | None = None,
    give_up_after: float = 60.0,
    overwrite_foreign: bool = False,
) -> int:
    console = console or Console(stderr=True)
    spool = SpoolDir(config.spool_dir, create=False)
    if dry_run:
        return list_runs(config, spool, uids, console, overwrite_foreign=overwrite_foreign)
    spool.lock("uploader")
    if warning := config.insecure_transport_warning():
        log.warning("%s", warning)
    for uid, reason in close_abandoned_runs(spool, config.spool):
        _say(console, _closed_line(uid, reason))
    runs = selected_runs(spool, uids)
    only = {r.uid for r in runs} if uids else None
    total = sum(r.received.documents for r in runs)
    _say(console, f"uploading {len(runs)} run(s), {total} documents, to {config.tiled.uri}")
    stop = threading.Event()
    uploader = Uploader(
        config,
        spool,
        only=only,
        stop=stop,
        give_up_after=None if watch else give_up_after,
        overwrite_foreign=overwrite_foreign,
    )
    started = time.monotonic()
    watcher = _start_watcher(spool, uploader) if watch else None
    finished = threading.Event()
    _start_progress(console, uploader, finished)
    try:
        uploader.run(until_idle=not watch)
    except TiledUnavailableError as err:
        left = [r.uid for r in spool.runs() if not r.uploaded.state.finished]
        raise TiledUnavailableError(f"{err}; {len(left)} run(s) remain in the spool") from None
    except KeyboardInterrupt:
        stop.set()
        _say(console, "interrupted; what was not uploaded stays in the spool")
        return 130
    finally:
        finished.set()
        if watcher is not None:
            stop.set()
    elapsed = time.monotonic() - started
    done = [r for r in spool.runs() if (only is None or r.uid in only)]
    quarantined = [r for r in done if r.uploaded.state == UploadState.QUARANTINED]
    _say(
        console,
        f"done in {elapsed:.1f} s: {uploader.status.runs_uploaded} run(s) uploaded, "
        f"{uploader.status.documents} documents, {uploader.status.rows} rows"
        + (f"; {len(quarantined)} quarantined (see status)" if quarantined else ""),
    )
    return 1 if quarantined else 0


def _start_progress(console: Console, uploader: Uploader, finished: threading.Event) -> threading.Thread:
    """Show how far the upload got until `finished`: a bar with rate and ETA on a terminal, else a
    plain line every PROGRESS_S (when it moved) with the same figures."""
    selected = [
        r
        for r in uploader.spool.runs()
        if (uploader.only is None or r.uid in uploader.only) and not r.uploaded.state.finished
    ]
    total = sum(max(0, r.received.documents - r.uploaded.documents) for r in selected)
    progress = UploadProgress(total, time.monotonic())

    def print_lines() -> None:
        said = (0, 0, 0)
        while not finished.wait(PROGRESS_S):
            status = uploader.status
            now = (status.runs_uploaded, status.documents, status.rows)
            if now != said:
                said = now
                _say(console, progress.line(*now, time.monotonic()))

    def bar() -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("uploading"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("documents, {task.fields[rate]}/s, {task.fields[runs]} run(s) done, ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True) as shown:
            task = shown.add_task("upload", total=total or None, rate="-", runs=0)
            while True:
                stopping = finished.wait(0.25)
                status = uploader.status
                now = time.monotonic()
                shown.update(
                    task,
                    completed=status.documents,
                    total=max(total, status.documents) or None,
                    rate=progress.rate_text(status.documents, now),
                    runs=status.runs_uploaded,
                )
                if stopping:
                    return

    thread = threading.Thread(
        target=bar if console.is_terminal else print_lines, name="progress", daemon=True
    )
    thread.start()
    return thread


class UploadProgress:
    """Rate and ETA of an upload of `total` documents that started at `started` (monotonic seconds)."""

    def __init__(self, total: int, started: float) -> None:
        self.total = total
        self.started = started

    def rate(self, documents: int, now: float) -> float | None:
        elapsed = now - self.started
        return documents / elapsed if elapsed > 0 and documents > 0 else None

    def rate_text(self, documents: int, now: float) -> str:
        rate = self.rate(documents, now)
        return "-" if rate is None else f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}"

    def line(self, runs: int, documents: int, rows: int, now: float) -> str:
        """The plain progress line: counts, share of the total, rate, ETA."""
        rate = self.rate(documents, now)
        share = f"/{self.total} ({100 * documents / self.total:.0f}%)" if self.total >= documents > 0 else ""
        eta = ""
        if rate and self.total > documents:
            left = int((self.total - documents) / rate)
            eta = f", ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
        return (
            f"... {runs} run(s) uploaded, {documents}{share} documents, {rows} rows so far; "
            f"{self.rate_text(documents, now)} documents/s{eta}"
        )


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


# ------------------------------------------------------------ import-backup
@dataclass
class BackupImport:
    """What importing one backup file did."""

    documents: int = 0
    runs: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    first_problem: str = ""
    dropped: int = 0

    def skip(self, where: str, problem: RejectedMessage) -> None:
        self.skipped[problem.reason] += 1
        if not self.first_problem:
            detail = f" ({problem.detail[:200]})" if problem.detail else ""
            self.first_problem = f"{where}: {problem.reason}{detail}"

    def summary(self, path: Path) -> str:
        line = f"{path}: {self.documents} documents, run(s) {', '.join(self.runs) or '-'}"
        if self.skipped:
            counts = ", ".join(f"{reason} {n}" for reason, n in self.skipped.most_common())
            line += f"; skipped {self.skipped.total()} ({counts}), first at {self.first_problem}"
        if self.dropped:
            line += f"; {self.dropped} dropped (the spool is full or not writable)"
        return line


def backup_entries(path: Path, max_line_bytes: int) -> Iterator[tuple[str, Entry]]:
    """(where, entry) for each entry of a TiledWriter backup; OSError if the file cannot be read.

    JSON Lines (``JSONLinesWriter``), or a JSON array: read whole if it is at
    most `max_line_bytes`, else (or if it does not parse, as ``JSONWriter``
    leaves it after a crash, or is over the budget) one entry per line. A
    line over `max_line_bytes` is skipped without being held in memory. Each
    parse has the wire decoder's budget for its length (`wire.budget_for`):
    an entry that would cost more is skipped as ``too-complex``.
    """
    if not path.is_file():  # a directory, a FIFO or a device would never end
        raise OSError(0, "not a regular file" if path.exists() else "no such file")
    with path.open("rb") as file:
        if _starts_array(file) and path.stat().st_size <= max_line_bytes:
            items = _parse(file.read(max_line_bytes + 1))
            if isinstance(items, list):
                yield from ((f"entry {n}", _entry(item)) for n, item in enumerate(items, 1))
                return
            file.seek(0)
        for n, line in enumerate(_lines(file, max_line_bytes), 1):
            if line is None:
                yield f"line {n}", RejectedMessage("line-too-long", f"over {max_line_bytes} bytes")
                continue
            line = line.strip()
            if line.endswith(b","):  # JSONWriter's array, one entry per line
                line = line[:-1]
            if line not in (b"", b"[", b"]"):
                yield f"line {n}", _entry(_parse(line))


def _starts_array(file: BinaryIO) -> bool:
    head = file.read(4096).lstrip()
    file.seek(0)
    return head.startswith(b"[")


def _lines(file: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The lines of `file`; None for a line over `limit` bytes (read past, never held)."""
    while line := file.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := file.readline(2**20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def _parse(raw: bytes) -> Any:
    """JSON with the wire decoder's budget (`wire.loads_json_checked`), or why not."""
    try:
        return loads_json_checked(raw)
    except DecodeError as err:
        reason = "too-complex" if err.reason == "too-complex" else "not-json"
        return RejectedMessage(reason, err.detail[:100])


def _entry(item: Any) -> Entry:
    if isinstance(item, RejectedMessage):
        return item
    if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("doc"), dict):
        return item["name"], item["doc"]
    return RejectedMessage(Rejection.NOT_A_DOCUMENT, "not {'name': ..., 'doc': {...}}")


def import_file(
    ingest: Ingest, path: Path, max_line_bytes: int, say: Callable[[str], None] = lambda _: None
) -> BackupImport:
    """Feed one backup file through `ingest`, close its runs and mark them for rewrite; never raises
    for what the file holds (an unreadable file is one skipped entry)."""
    result = BackupImport()
    dropped = ingest.stats.dropped
    report_at = time.monotonic() + PROGRESS_S
    try:
        for where, entry in backup_entries(path, max_line_bytes):
            if isinstance(entry, RejectedMessage):
                result.skip(where, entry)
                continue
            name, doc = entry
            try:
                ingest.accept(name, doc)
            except RejectedMessage as rejected:
                result.skip(where, rejected)
                continue
            result.documents += 1
            if name == "start" and doc["uid"] in ingest.tracker.runs:
                result.runs.append(doc["uid"])
            if result.documents % 1000 == 0:
                ingest.upkeep()
                if time.monotonic() >= report_at:
                    report_at = time.monotonic() + PROGRESS_S
                    say(f"{path}: ... {result.documents} documents so far")
    except OSError as err:
        result.skip("the file", RejectedMessage("unreadable", err.strerror or type(err).__name__))
    ingest.close_all(NO_STOP)
    for uid in result.runs:
        # To be uploaded again; a copy in Tiled is deleted only if this spool created it.
        directory = ingest.spool.run_dir(uid)
        previous = Uploaded.load(directory)
        Uploaded(state=UploadState.PENDING, created=previous.created, attempts=previous.attempts).save(
            directory
        )
    result.dropped = ingest.stats.dropped - dropped
    return result


def import_backup(
    config: Config, paths: list[Path], console: Console | None = None, *, overwrite_foreign: bool = False
) -> int:
    console = console or Console(stderr=True)
    spool = SpoolDir(config.spool_dir)
    spool.lock("uploader")
    ingest = Ingest(config.spool, spool, ReceiverStats())
    imported: list[str] = []
    skipped = 0
    try:
        ingest.upkeep()  # learns the spool's size, for max_bytes
        for path in paths:
            result = import_file(ingest, path, config.zmq.max_message_bytes, lambda line: _say(console, line))
            _say(console, result.summary(path))
            imported += result.runs
            skipped += result.skipped.total()
    finally:
        ingest.shutdown()
    spool.unlock()
    if skipped:
        _say(console, f"{skipped} backup entries were not imported (see above)")
    uploaded = (
        replay(config, imported, console=console, overwrite_foreign=overwrite_foreign) if imported else 0
    )
    return max(uploaded, 1 if skipped else 0)
