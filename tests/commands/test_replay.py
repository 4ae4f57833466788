"""import-backup's ingestion and replay's closing of abandoned runs, on a tmp_path spool (no Tiled).

Backups are written as TiledWriter writes them (bluesky-tiled-plugins'
`JSONLinesWriter` / `JSONWriter`), then spoiled the ways a crash, a bug or a
hostile file spoils them.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import event_model
import pytest
from bluesky_tiled_plugins.writing._json_writer import JSONLinesWriter, JSONWriter
from rich.console import Console

from tests.support.spool import plant_open_run
from tiled_writer_sidecar.cli import main
from tiled_writer_sidecar.commands import replay as replay_module
from tiled_writer_sidecar.commands.replay import (
    NO_STOP,
    backup_entries,
    close_abandoned_runs,
    import_file,
)
from tiled_writer_sidecar.config import SpoolConfig
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.ingest import Ingest
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import Received, Uploaded, UploadState
from tiled_writer_sidecar.testing import wait_until

Document = tuple[str, dict[str, Any]]
DATA_KEYS: dict[str, Any] = {"det": {"dtype": "number", "shape": [], "source": "SIM:det"}}
MAX_LINE = 2**20


def composed(n_events: int) -> list[Document]:
    """A whole run as a RunEngine would emit it, as JSON would give it back (lists, plain values)."""
    bundle = event_model.compose_run()
    desc = bundle.compose_descriptor(name="primary", data_keys=DATA_KEYS)
    docs: list[Document] = [("start", dict(bundle.start_doc)), ("descriptor", dict(desc.descriptor_doc))]
    for seq in range(1, n_events + 1):
        docs.append(
            ("event", dict(desc.compose_event(data={"det": 1.0}, timestamps={"det": 0.0}, seq_num=seq)))
        )
    docs.append(("stop", dict(bundle.compose_stop())))
    return [(name, doc) for name, doc in json.loads(json.dumps(docs))]


def jsonl_backup(directory: Path, docs: list[Document]) -> Path:
    writer = JSONLinesWriter(str(directory))
    for name, doc in docs:
        writer(name, doc)
    assert writer.filename is not None
    return directory / str(writer.filename)


def ingest(tmp_path: Path, **spool: Any) -> Ingest:
    root = tmp_path / "spool"
    return Ingest(SpoolConfig(dir=str(root), **spool), SpoolDir(root), ReceiverStats())


def received(target: Ingest, uid: str) -> Received:
    state = Received.load(target.spool.run_dir(uid))
    assert state is not None
    return state


def test_a_jsonl_backup_is_spooled_whole_closed_by_its_stop_and_marked_for_upload(tmp_path: Path) -> None:
    """Every document of a JSONLinesWriter backup is spooled through Ingest; the run is closed complete
    and marked `pending`, not created here: a copy in Tiled from another writer is never replaced."""
    docs = composed(5)
    uid = docs[0][1]["uid"]
    target = ingest(tmp_path)
    result = import_file(target, jsonl_backup(tmp_path / "backup", docs), MAX_LINE)
    assert (result.documents, result.runs, result.skipped.total()) == (len(docs), [uid], 0)
    state = received(target, uid)
    assert state.closed and state.close_reason == "stop" and state.documents == len(docs)
    assert state.events == {"primary": 5} and state.problems() == []
    uploaded = Uploaded.load(target.spool.run_dir(uid))
    assert uploaded.state == UploadState.PENDING and not uploaded.created


def test_jsonwriter_arrays_whole_or_cut_by_a_crash_give_the_same_documents(tmp_path: Path) -> None:
    """JSONWriter's array, complete (read whole) and without its stop and closing bracket (read per
    line, as a crash leaves it): the same entries as the JSON Lines file, nothing skipped."""
    docs = composed(3)
    writer = JSONWriter(str(tmp_path / "array"))
    for name, doc in docs:
        writer(name, doc)
    assert writer.filename is not None
    whole = tmp_path / "array" / writer.filename
    cut = tmp_path / "cut.json"
    cut.write_text("".join(whole.read_text().splitlines(keepends=True)[:-2]))  # no stop, no "]"

    def pairs(path: Path) -> list[Any]:
        return [entry for _, entry in backup_entries(path, MAX_LINE)]

    assert pairs(whole) == docs
    assert pairs(cut) == docs[:-1]


def test_bad_entries_are_skipped_and_counted_per_reason_and_the_good_run_is_imported(tmp_path: Path) -> None:
    """A file mixing a good run with a malformed line, non-dicts, a doc that is not a dict, an unsafe
    uid, an unknown document name, a 5,000-digit number, deep nesting, invalid UTF-8 and an over-long
    line: each is skipped with its reason, the first is named by line, the run is whole, no exception."""
    docs = composed(2)
    good = [json.dumps({"name": name, "doc": doc}).encode() for name, doc in docs]
    unsafe = {**docs[0][1], "uid": "../../etc"}
    bad = [
        b'{"name": "event", "doc": {',
        b"[1, 2]",
        b"42",
        json.dumps({"name": "start", "doc": "x"}).encode(),
        json.dumps({"name": "start", "doc": unsafe}).encode(),
        json.dumps({"name": "nonsense", "doc": {}}).encode(),
        b'{"name": "event", "doc": {"n": ' + b"9" * 5000 + b"}}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"name": "\xff\xfe", "doc": {}}',
        b'{"name": "event", "doc": {"pad": "' + b"x" * 300_000 + b'"}}',
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([good[0], *bad, *good[1:]]) + b"\n")
    target = ingest(tmp_path)
    result = import_file(target, path, 250_000)
    assert result.documents == len(docs) and result.runs == [docs[0][1]["uid"]]
    assert result.skipped == {
        "not-json": 3,
        "too-complex": 1,  # the deep nesting: the wire decoder's budget and depth (issue 20)
        "not-a-document": 3,
        "unsafe-uid": 1,
        "schema": 1,
        "line-too-long": 1,
    }
    assert result.first_problem.startswith("line 2: not-json")
    assert received(target, docs[0][1]["uid"]).problems() == []
    summary = result.summary(path)
    assert f"skipped {len(bad)}" in summary and "\n" not in summary


def test_a_backup_cut_short_closes_its_run_incomplete_and_counts_the_torn_line(tmp_path: Path) -> None:
    """A backup that ends in the middle of an event line (TiledWriter died): the torn line is skipped as
    not-json, the run is closed because the file ends without a stop, and says its stop never came."""
    docs = composed(4)
    path = jsonl_backup(tmp_path / "backup", docs[:-1])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 20])
    target = ingest(tmp_path)
    result = import_file(target, path, MAX_LINE)
    assert result.documents == len(docs) - 2 and result.skipped == {"not-json": 1}
    state = received(target, docs[0][1]["uid"])
    assert state.closed and state.close_reason == NO_STOP
    assert any("stop never came" in p for p in state.problems())


def test_importing_a_run_the_spool_holds_skips_it_and_leaves_the_spooled_copy(tmp_path: Path) -> None:
    """The same backup twice: the second time its start is a repeated-start and its other documents
    have no open run; the first copy keeps its documents."""
    docs = composed(2)
    uid = docs[0][1]["uid"]
    path = jsonl_backup(tmp_path / "backup", docs)
    import_file(ingest(tmp_path), path, MAX_LINE)
    again = ingest(tmp_path)
    result = import_file(again, path, MAX_LINE)
    assert result.documents == 0 and result.runs == []
    assert result.skipped["repeated-start"] == 1 and result.skipped.total() == len(docs)
    assert received(again, uid).documents == len(docs)


def test_long_imports_say_how_far_they_got(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the progress interval at zero, a 2,000-event backup reports progress while it is read."""
    monkeypatch.setattr(replay_module, "PROGRESS_S", 0.0)
    docs = composed(2000)
    lines: list[str] = []
    result = import_file(ingest(tmp_path), jsonl_backup(tmp_path / "backup", docs), MAX_LINE, lines.append)
    assert result.documents == len(docs)
    assert lines and all("documents so far" in line for line in lines)


def test_the_command_reports_bad_files_in_one_line_each_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """import-backup on a garbage file, a directory and a missing file: one line per file naming the
    reason, a final count, exit 1, no traceback, and no upload attempted (nothing was imported)."""
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\x01 not json\n[\x1b[31m\n")
    paths = [garbage, tmp_path, tmp_path / "missing.jsonl"]
    code = main(["import-backup", *map(str, paths), "--spool-dir", str(tmp_path / "spool")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert len(lines) == 4 and lines[-1] == "4 backup entries were not imported (see above)"
    assert "skipped 2 (not-json 2), first at line 1" in lines[0]
    assert "unreadable (not a regular file)" in lines[1] and "unreadable (no such file)" in lines[2]


def test_replay_closes_abandoned_runs_with_counts_from_their_logs(tmp_path: Path) -> None:
    """Runs a dead receiver left open: replay closes them with their log's counts and gaps; a run
    whose stop is in its log is closed by it; none is touched while a receiver holds its lock."""
    root = tmp_path / "spool"
    cut = composed(5)
    without_stop = plant_open_run(root, [*cut[:4], *cut[5:6]])  # seq_num 3 missing, no stop
    with_stop = plant_open_run(root, composed(1))
    spool = SpoolDir(root)
    Received(uid=without_stop, documents=1).save(spool.run_dir(without_stop))  # saved long before the kill
    spool.lock("receiver")
    assert close_abandoned_runs(SpoolDir(root)) == []
    spool.unlock()
    closed = dict(close_abandoned_runs(SpoolDir(root)))
    assert closed == {without_stop: replay_module.ABANDONED, with_stop: "stop"}
    state = Received.load(spool.run_dir(without_stop))
    assert state is not None and state.closed and state.documents == 5 and state.missing == {"primary": 1}
    finished = Received.load(spool.run_dir(with_stop))
    assert finished is not None and finished.closed and finished.problems() == []


def test_a_long_upload_says_how_far_it_got_only_when_it_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """replay's progress line: printed when the uploader's counts change, not again while they stand
    still, and never after the upload finished."""
    monkeypatch.setattr(replay_module, "PROGRESS_S", 0.01)
    out = io.StringIO()
    status = SimpleNamespace(runs_uploaded=0, documents=0, rows=0)
    finished = threading.Event()
    no_runs = SimpleNamespace(runs=lambda: [])
    thread = replay_module._start_progress(
        Console(file=out, width=200),
        SimpleNamespace(status=status, spool=no_runs, only=None),  # type: ignore[arg-type]
        finished,
    )
    status.runs_uploaded, status.documents, status.rows = 1, 8, 5
    wait_until(lambda: "so far" in out.getvalue(), 10, what="a progress line")
    time.sleep(0.1)  # several intervals with nothing new: nothing more is said
    finished.set()
    thread.join(5)
    assert out.getvalue().count("\n") == 1
    assert out.getvalue().startswith("... 1 run(s) uploaded, 8 documents, 5 rows so far; ")
    assert out.getvalue().endswith(" documents/s\n")  # no total known: a rate, no ETA


def test_the_plain_progress_line_gives_share_rate_and_eta() -> None:
    """Off a terminal: 250 of 1000 documents after 5 s is 25%, 50 documents/s, 15 s left."""
    progress = replay_module.UploadProgress(1000, started=100.0)
    assert progress.line(2, 250, 240, now=105.0) == (
        "... 2 run(s) uploaded, 250/1000 (25%) documents, 240 rows so far; 50 documents/s, ETA 0:00:15"
    )
