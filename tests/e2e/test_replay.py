"""`replay`, `import-backup`, `status` and `verify` from the command line, against a real Tiled."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from bluesky_tiled_plugins.writing._json_writer import JSONLinesWriter
from ophyd.sim import det, motor

from tiled_writer_sidecar.testing import TiledContainer
from tiled_writer_sidecar.testing.acquisition import DocumentRecorder, expected_rows
from tiled_writer_sidecar.testing.sidecar import sidecar_command, spool_documents
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

Document = tuple[str, dict[str, Any]]


def _record(*plans: Any) -> list[Document]:
    RE = RunEngine({})
    recorder = DocumentRecorder()
    RE.subscribe(recorder)
    for plan in plans:
        RE(plan)
    return recorder.documents


def _cli(*args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TILED_API_KEY"}
    if api_key:
        env["TILED_API_KEY"] = api_key
    return subprocess.run([*sidecar_command(), *args], capture_output=True, text=True, env=env, timeout=300)


def _uids(documents: list[Document]) -> list[str]:
    return [doc["uid"] for name, doc in documents if name == "start"]


def test_replay_dry_run_then_upload_every_row_once(tiled_container: TiledContainer, tmp_path: Path) -> None:
    """--dry-run lists and changes nothing; replay uploads each run row for row; a second replay adds nothing."""
    documents = _record(bp.count([det], 7), bp.scan([det], motor, 0, 1, 4))
    uids = _uids(documents)
    spool = tmp_path / "spool"
    spool_documents(spool, documents)
    dry = _cli("replay", "--dry-run", "--spool-dir", str(spool), "--tiled-uri", tiled_container.uri)
    assert dry.returncode == 0, dry.stderr
    assert (
        all(f"would upload {uid}" in dry.stdout for uid in uids)
        and "2 run(s) would be uploaded" in dry.stdout
    )
    assert "DELETE" not in dry.stdout
    assert not any(uid in tiled_container.client() for uid in uids)

    done = _cli(
        "replay",
        "--spool-dir",
        str(spool),
        "--tiled-uri",
        tiled_container.uri,
        api_key=tiled_container.api_key,
    )
    assert done.returncode == 0, done.stderr
    assert "2 run(s) uploaded" in done.stderr
    for uid in uids:
        expected = expected_rows(documents, run_uid=uid)
        assert frame_rows(read_stream(tiled_container.client(), uid)) == expected
    status = json.loads(_cli("status", "--json", "--spool-dir", str(spool)).stdout)
    assert {r["uid"]: r["state"] for r in status["runs"]} == dict.fromkeys(uids, "uploaded")

    again = _cli(
        "replay",
        "--spool-dir",
        str(spool),
        "--tiled-uri",
        tiled_container.uri,
        api_key=tiled_container.api_key,
    )
    assert again.returncode == 0 and "uploading 0 run(s)" in again.stderr
    assert len(read_stream(tiled_container.client(), uids[0])) == 7


@pytest.mark.process
def test_replay_with_tiled_unreachable_is_one_clear_line(tmp_path: Path) -> None:
    """Tiled down: replay gives up after its deadline with one line, exit 1, and the data stays spooled."""
    documents = _record(bp.count([det], 3))
    spool = tmp_path / "spool"
    spool_documents(spool, documents)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[spool]\ndir = "{spool}"\n[tiled]\nuri = "http://127.0.0.1:9"\nbackoff_max_seconds = 0.5\n'
    )
    result = subprocess.run(
        [*sidecar_command(), "replay", "--config", str(config), "--give-up-after", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "1 run(s) remain in the spool" in errors[0]
    status = json.loads(_cli("status", "--json", "--spool-dir", str(spool)).stdout)
    assert status["runs"][0]["state"] in ("pending", "uploading")


def test_import_backup_never_replaces_a_run_another_writer_made_unless_asked(
    tiled_container: TiledContainer, tmp_path: Path
) -> None:
    """A TiledWriter JSONL backup of a run that in-process TiledWriter holds only partly: import-backup
    quarantines it and leaves Tiled's copy alone (exit 1); with --overwrite-foreign it replaces it whole."""
    documents = _record(bp.count([det], 12))
    (uid,) = _uids(documents)
    backup_dir = tmp_path / "backup"
    writer = JSONLinesWriter(str(backup_dir))
    for name, doc in documents:
        writer(name, doc)
    # What in-process TiledWriter left behind before it failed: start, descriptor and 5 events.
    partial = TiledWriter(tiled_container.client(), batch_size=1)
    for name, doc in documents[:7]:
        partial(name, doc)
    assert len(read_stream(tiled_container.client(), uid)) == 5

    def import_backup(spool: str, *flags: str) -> subprocess.CompletedProcess[str]:
        files = map(str, backup_dir.iterdir())
        return _cli(
            "import-backup",
            *files,
            *flags,
            "--spool-dir",
            str(tmp_path / spool),
            "--tiled-uri",
            tiled_container.uri,
            api_key=tiled_container.api_key,
        )

    refused = import_backup("spool-a")
    assert refused.returncode == 1 and "1 quarantined" in refused.stderr, refused.stderr
    assert len(read_stream(tiled_container.client(), uid)) == 5
    status = json.loads(_cli("status", "--json", "--spool-dir", str(tmp_path / "spool-a")).stdout)
    assert "did not create it" in status["runs"][0]["reason"]

    result = import_backup("spool-b", "--overwrite-foreign")
    assert result.returncode == 0, result.stderr
    assert frame_rows(read_stream(tiled_container.client(), uid)) == expected_rows(documents)
    assert tiled_container.client()[uid].metadata["stop"]["num_events"] == {"primary": 12}


def test_replay_never_deletes_a_run_another_writer_made(
    tiled_container: TiledContainer, tmp_path: Path
) -> None:
    """In-process TiledWriter wrote the run (owner beamline-A); the spool holds a forged copy of that uid.
    --dry-run says, on stdout, it would not upload it (and that --overwrite-foreign would DELETE it);
    replay quarantines it and Tiled's run is untouched; replay of the quarantined run again leaves it."""
    documents = _record(bp.count([det], 5, md={"owner": "beamline-A"}))
    (uid,) = _uids(documents)
    inprocess = TiledWriter(tiled_container.client())
    for name, doc in documents:
        inprocess(name, doc)
    forged = [(n, {**d, "owner": "FORGED"} if n == "start" else d) for n, d in documents]
    spool = tmp_path / "spool"
    spool_documents(spool, forged)
    common = ("--spool-dir", str(spool), "--tiled-uri", tiled_container.uri)

    dry = _cli("replay", "--dry-run", *common, api_key=tiled_container.api_key)
    assert dry.returncode == 0, dry.stderr
    assert f"would NOT upload {uid}" in dry.stdout and "--overwrite-foreign would DELETE" in dry.stdout
    dry_overwrite = _cli(
        "replay", "--dry-run", "--overwrite-foreign", *common, api_key=tiled_container.api_key
    )
    assert f"would DELETE the run in Tiled and rewrite it: {uid}" in dry_overwrite.stdout

    for _ in range(2):  # the pending run, then the quarantined run named by uid
        done = _cli("replay", *common, *([uid] if _ else []), api_key=tiled_container.api_key)
        assert done.returncode == 1 and "1 quarantined" in done.stderr, done.stderr
        assert tiled_container.client()[uid].metadata["start"]["owner"] == "beamline-A"
        assert len(read_stream(tiled_container.client(), uid)) == 5
    status = json.loads(_cli("status", "--json", "--spool-dir", str(spool)).stdout)
    assert status["runs"][0]["state"] == "quarantined" and "did not create it" in status["runs"][0]["reason"]


@pytest.mark.process
def test_status_and_verify_on_a_missing_spool_are_one_line_errors(tmp_path: Path) -> None:
    """Pointing at a directory that is not a spool: exit 1, one line, no traceback."""
    for command in ("status", "verify", "replay"):
        result = _cli(command, "--spool-dir", str(tmp_path / "nowhere"))
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr.count("\n") == 1 and "not a spool directory" in result.stderr


@pytest.mark.process
def test_verify_reports_every_record_and_exits_zero_on_a_cleanspool_documents(tmp_path: Path) -> None:
    """verify reads every record of every run and says ok."""
    documents = _record(bp.count([det], 4))
    spool = tmp_path / "spool"
    spool_documents(spool, documents)
    result = _cli("verify", "--spool-dir", str(spool))
    assert result.returncode == 0
    assert f"{len(documents)} records, 0 with problems" in result.stdout
