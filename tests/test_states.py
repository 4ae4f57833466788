"""The shared names in milliseconds: their values are the strings on disk and on the wire, and every
reason the receiver can reject with is one of them.

No process: uploader.json is written and read in tmp_path, and the sources of the
modules that raise a rejection are read for the reasons they name.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import tiled_writer_sidecar
from tiled_writer_sidecar.daemon.health import Health, HealthStatus
from tiled_writer_sidecar.documents.tracker import RunTracker
from tiled_writer_sidecar.documents.wire import REASONS
from tiled_writer_sidecar.errors import ValidationError
from tiled_writer_sidecar.spool.state_files import UPLOADER, UploaderStatus
from tiled_writer_sidecar.states import (
    TILED_STATES,
    Rejection,
    RejectionCategory,
    TiledState,
    counted,
    rejection_category,
)
from tiled_writer_sidecar.tools.monitor.state import sidecar_state

SRC = Path(tiled_writer_sidecar.__file__).parent
#: What an existing spool, a metric label, /healthz and the alert rules hold (conf/prometheus).
ON_DISK_TILED = ["connecting", "up", "down", "unauthorized", "not_tiled"]


def test_tiled_states_are_the_strings_an_existing_uploader_json_holds(tmp_path: Path) -> None:
    """Each state written by an older uploader loads as its member, and is written back byte for byte;
    an unknown or hostile value loads as ``unknown``."""
    assert [str(s) for s in TILED_STATES] == ON_DISK_TILED
    for value in ON_DISK_TILED:
        (tmp_path / UPLOADER).write_text(json.dumps({"tiled": value}))
        loaded = UploaderStatus.load(tmp_path)
        assert loaded is not None and loaded.tiled is TiledState(value)
        loaded.save(tmp_path)
        assert json.loads((tmp_path / UPLOADER).read_text())["tiled"] == value
        assert f'"tiled": "{value}"' in (tmp_path / UPLOADER).read_text()
    for hostile in ("upp", ["up"], None, 3):
        (tmp_path / UPLOADER).write_text(json.dumps({"tiled": hostile}))
        loaded = UploaderStatus.load(tmp_path)
        assert loaded is not None and loaded.tiled is TiledState.UNKNOWN


def test_only_a_wrong_setting_is_misconfigured() -> None:
    """`misconfigured` (a person must act) is exactly unauthorized and not_tiled: health warns, status
    --check is CRITICAL."""
    assert {s for s in TiledState if s.misconfigured} == {TiledState.UNAUTHORIZED, TiledState.NOT_TILED}


def test_health_status_serializes_as_before_and_maps_to_the_monitors_states() -> None:
    """/healthz says ok, degraded or unhealthy (JSON strings); the monitor shows up, degraded, unhealthy."""
    assert [str(s) for s in HealthStatus] == ["ok", "degraded", "unhealthy"]
    assert json.dumps({"status": HealthStatus.DEGRADED}) == '{"status": "degraded"}'
    assert [sidecar_state(s) for s in ("ok", "degraded", "unhealthy", None, 7)] == [
        "up",
        "degraded",
        "unhealthy",
        "unhealthy",
        "unhealthy",
    ]
    assert Health.__dataclass_fields__["status"].type == "HealthStatus"


#: The modules a message goes through from the wire to the spool (the receiver counts what they reject).
RECEIVING = (
    "documents/wire.py",
    "documents/validation.py",
    "documents/tracker.py",
    "receive/ingest.py",
    "spool/orphans.py",
    "receive/receiver.py",
)
#: Raised while reading the spool back (crash recovery), never for a message: logged, not counted.
NOT_OF_A_MESSAGE = {"orphan-log"}


def _reasons() -> tuple[set[str], set[str]]:
    """The first argument of every ``DecodeError(...)``, ``ValidationError(...)``, ``RejectedMessage(...)``
    in the receiving modules: the string literals, and the names of the ``Rejection.X`` members."""
    literals, members = set(), set()
    for name in RECEIVING:
        for node in ast.walk(ast.parse((SRC / name).read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("DecodeError", "ValidationError", "RejectedMessage")
                and node.args
            ):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                literals.add(first.value)
            elif (
                isinstance(first, ast.Attribute)
                and isinstance(first.value, ast.Name)
                and first.value.id == "Rejection"
            ):
                members.add(first.attr)
    return literals - NOT_OF_A_MESSAGE, members


def test_every_reason_the_receiving_path_rejects_with_is_a_rejection() -> None:
    """wire, validation, tracker, ingest and the receiver name every reason as a `Rejection` member, never
    as a bare string (so /metrics exports each at 0 and the monitor knows its category)."""
    literals, members = _reasons()
    assert not literals, literals
    assert len(members) > 15 and members <= {r.name for r in Rejection}


@pytest.mark.parametrize("name", ["descriptor", "resource", "stream_resource", "stop"])
def test_a_document_of_a_run_never_started_is_an_orphan(name: str) -> None:
    """The tracker's reason for it is a `Rejection` of category ORPHAN (what the monitor counts as an
    orphan, not as a malformed document)."""
    tracker = RunTracker()
    doc = {"uid": "d-1", "run_start": "never-started", "name": "primary", "data_keys": {}, "time": 1.0}
    doc |= {"resource": "r-1", "spec": "x", "root": "", "resource_path": "p", "resource_kwargs": {}}
    doc |= {"exit_status": "success", "data_key": "x", "mimetype": "x", "uri": "file:///x", "parameters": {}}
    with pytest.raises(ValidationError) as caught:
        tracker.route(name, doc)
    assert caught.value.reason == f"{name}-for-unknown-run"
    assert rejection_category(caught.value.reason) is RejectionCategory.ORPHAN


def test_categories_say_what_is_counted_and_what_the_decoder_raises() -> None:
    """Another publisher's messages are the only ones not counted; `wire.REASONS` is the decoder's
    reasons in their old order; a reason outside the enum has no category but is counted."""
    assert [r for r in Rejection if not counted(r)] == [Rejection.PREFIX_MISMATCH]
    assert list(REASONS) == [
        "frame-count",
        "oversized",
        "envelope",
        "prefix-mismatch",
        "unknown-document",
        "truncated",
        "garbage",
        "pickle-forbidden-global",
        "msgpack-object-array",
        "too-complex",
        "not-a-document",
        "unsupported-type",
    ]
    assert rejection_category("internal-error:KeyError") is None and counted("internal-error:KeyError")
    orphans = {str(r) for r in Rejection if r.category is RejectionCategory.ORPHAN}
    assert orphans == {
        r for r in map(str, Rejection) if r.endswith(("-for-unknown-run", "-before-descriptor"))
    } | {"datum-before-resource"}
