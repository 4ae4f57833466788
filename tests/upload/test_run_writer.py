"""run_writer without a Tiled server: the start-up check of TiledWriter's private hooks, and what an
append tells (rows acknowledged, the shared table lock)."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pyarrow
import pytest
from bluesky_tiled_plugins.writing import tiled_writer

from tests.support.fake_tiled import http_error
from tiled_writer_sidecar.errors import IncompatibleDependency
from tiled_writer_sidecar.upload import run_writer
from tiled_writer_sidecar.upload.run_writer import PRIVATE_HOOKS, SidecarRunWriter, check_tiledwriter_api


def test_the_installed_bluesky_tiled_plugins_has_every_hook() -> None:
    """The locked bluesky-tiled-plugins passes the check the uploader makes when it starts."""
    check_tiledwriter_api()


@pytest.mark.parametrize("hook", [name for name, params in PRIVATE_HOOKS.items() if params is not None])
def test_a_renamed_hook_fails_in_one_line_naming_it_and_the_supported_versions(
    hook: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release without one of the private methods is refused by name, not discovered mid-run."""
    monkeypatch.delattr(tiled_writer._RunWriter, hook)
    with pytest.raises(IncompatibleDependency, match=rf"hook {hook}; .*>=2\.0\.12,<2\.1") as info:
        check_tiledwriter_api()
    assert "\n" not in str(info.value)


def test_a_hook_whose_parameters_changed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same name, other parameters: the sidecar's override would be called wrongly, so it is refused."""
    monkeypatch.setattr(tiled_writer._RunWriter, "_append_with_retry", lambda self, client, rows: None)
    with pytest.raises(IncompatibleDependency, match="_append_with_retry"):
        check_tiledwriter_api()


# ----------------------------------------------------------------- appends: acknowledged rows, one table writer


class _Table:
    """A stream table's client as `SidecarRunWriter._append` uses it: appends land, or fail first."""

    def __init__(self, key: str = "internal", failures: list[Exception] | None = None) -> None:
        self.item = {"id": key}
        self.uri = f"http://tiled/api/v1/metadata/run/primary/{key}"
        self.rows: list[int] = []
        self.failures = failures or []
        self.lock_held: list[bool] = []
        self.serial: threading.Lock | None = None

    def append_partition(self, partition: int, table: pyarrow.Table) -> None:
        self.lock_held.append(self.serial is not None and self.serial.locked())
        if self.failures:
            raise self.failures.pop(0)
        self.rows += table["seq_num"].to_pylist()


class _NoWait:
    def wait(self, err: Exception) -> None:
        return None

    def recovered(self) -> None:
        return None


def _rows(*seq_nums: int) -> pyarrow.Table:
    return pyarrow.table({"seq_num": list(seq_nums), "time": [0.0] * len(seq_nums)})


def test_rows_appended_at_the_first_attempt_are_acknowledged_without_a_read_back() -> None:
    """Each append answered 2xx at once counts: the stream's rows are known, no read-back needed."""
    writer = SidecarRunWriter(None, 100, _NoWait())
    table = _Table()
    writer._append(table, _rows(1, 2, 3), "primary")
    writer._append(table, _rows(4, 5), "primary")
    assert writer.acknowledged_rows("primary") == 5 and table.rows == [1, 2, 3, 4, 5]
    assert writer.acknowledged_rows("baseline") == 0  # a stream with no rows


def test_a_retried_append_or_a_split_table_leaves_only_a_read_back_to_tell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An append that failed once (then found not landed and sent again), or a part of a table split
    above 1024 columns: acknowledged_rows is None, so the uploader reads the stream back."""
    monkeypatch.setattr(run_writer, "read_table_column", lambda table, column: list(table.rows))
    writer = SidecarRunWriter(None, 100, _NoWait())
    busy = http_error(500)
    table = _Table(failures=[busy])
    writer._append(table, _rows(1, 2), "primary")
    assert table.rows == [1, 2] and writer.acknowledged_rows("primary") is None
    writer._append(_Table("internal_0"), _rows(1), "wide")
    assert writer.acknowledged_rows("wide") is None


def test_runs_append_one_at_a_time_under_the_shared_lock() -> None:
    """With `serial` (a lane of the shared lock, live or backlog), every append is sent holding it;
    without, never."""
    lock = run_writer.TablesLock()
    for lane in (lock.lane(live=False), lock.lane(live=True)):
        locked = _Table()
        locked.serial = lane  # type: ignore[assignment]
        SidecarRunWriter(None, 100, _NoWait(), lane)._append(locked, _rows(1), "primary")
        assert locked.lock_held == [True] and not lock.locked()
    free = _Table()
    SidecarRunWriter(None, 100, _NoWait())._append(free, _rows(1), "primary")
    assert free.lock_held == [False]


def test_the_live_lane_takes_the_table_lock_before_waiting_backlog_runs() -> None:
    """A backlog run holds the lock; another backlog run and then a live run wait: the live one goes next."""
    lock = run_writer.TablesLock()
    order: list[str] = []

    def request(lane: str) -> None:
        with lock.lane(live=lane == "live"):
            order.append(lane)

    def until(condition: Any) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    with lock.lane(live=False):
        backlog = threading.Thread(target=request, args=("backlog",))
        backlog.start()
        until(lambda: backlog.is_alive())
        live = threading.Thread(target=request, args=("live",))
        live.start()
        until(lambda: lock._live_waiting == 1)
    live.join(30)
    backlog.join(30)
    assert order == ["live", "backlog"] and not lock.locked()


# ----------------------------------------------------------------- close_stream, table creates


class _Node:
    """A node as `_close_stream_tree` and `SeqNumOrderedNode` use it: closes and creates are recorded."""

    def __init__(self, uri: str, failures: list[Exception] | None = None) -> None:
        self.uri = uri
        self.item = {"id": uri.rsplit("/", 1)[-1]}
        self.closed: list[str] = []
        self.created: list[str] = []
        self.failures = failures or []

    def close_stream(self) -> None:
        self.closed.append(self.uri)

    def new(self, family: object, sources: object, *, key: str, **kwargs: object) -> _Node:
        if self.failures:
            raise self.failures.pop(0)
        self.created.append(key)
        return _Node(f"{self.uri}/{key}")


@pytest.mark.parametrize("matters", [True, False])
def test_with_close_streams_auto_close_stream_requests_are_sent_only_when_tiled_does_something_with_them(
    monkeypatch: pytest.MonkeyPatch, matters: bool
) -> None:
    """``close_streams = "auto"``: TiledWriter's end of a run closes every node (leaves first) unless Tiled
    has neither streaming nor webhooks (`close_stream_matters`, asked about the node runs are written into)."""
    asked: list[object] = []
    monkeypatch.setattr(run_writer, "close_stream_matters", lambda node: asked.append(node) or matters)
    base = _Node("http://tiled/api/v1/metadata/beamline")
    writer = SidecarRunWriter(base, 100, _NoWait(), close_streams="auto")
    run, stream, table = (_Node(f"{base.uri}/run"), _Node(f"{base.uri}/run/primary"), _Node("t"))
    writer.root_node, writer._desc_nodes["primary"], writer._internal_tables["primary"] = run, stream, table
    writer._close_stream_tree()
    assert asked == [base]
    assert (table.closed + stream.closed + run.closed) == (
        [table.uri, stream.uri, run.uri] if matters else []
    )


def test_by_default_every_node_is_closed_and_tiled_is_never_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``close_streams = "always"`` (the default): the closes in-process TiledWriter sends, no probe."""
    monkeypatch.setattr(run_writer, "close_stream_matters", lambda node: pytest.fail("probed"))
    base = _Node("http://tiled/api/v1/metadata/beamline")
    writer = SidecarRunWriter(base, 100, _NoWait())
    run, stream, table = (_Node(f"{base.uri}/run"), _Node(f"{base.uri}/run/primary"), _Node("t"))
    writer.root_node, writer._desc_nodes["primary"], writer._internal_tables["primary"] = run, stream, table
    writer._close_stream_tree()
    assert table.closed + stream.closed + run.closed == [table.uri, stream.uri, run.uri]


def test_a_table_create_tiled_refused_unapplied_is_sent_again_in_place() -> None:
    """A 500 ("database is locked": Tiled rolled the node back) or a refused connection: created once."""
    node = _Node(
        "http://tiled/api/v1/metadata/run/primary", [http_error(500, "POST"), http_error(503, "POST")]
    )
    schema = pyarrow.schema([("seq_num", pyarrow.int64())])
    table = run_writer.SeqNumOrderedNode(node, {}, _NoWait()).create_appendable_table(schema, key="internal")
    assert node.created == ["internal"] and table.uri.endswith("/internal")


class _LockedNode(_Node):
    """A `_Node` that records whether the shared table lock was held at each create."""

    def __init__(self, uri: str, lock: run_writer.TablesLock) -> None:
        super().__init__(uri)
        self.lock = lock
        self.held: list[bool] = []

    def new(self, family: object, sources: object, *, key: str, **kwargs: object) -> _Node:
        self.held.append(self.lock.locked())
        return super().new(family, sources, key=key, **kwargs)


def test_a_table_create_holds_the_table_lock_only_while_a_live_run_is_around() -> None:
    """Without a live run, backlog creates go unserialized (a drain of small runs is not capped at one
    create at a time); once a live lane has taken the lock, every create holds it, the live run's
    own first, so no create ever refuses a live append (Tiled would stream its rows, then the retry)."""
    lock = run_writer.TablesLock()
    schema = pyarrow.schema([("seq_num", pyarrow.int64())])

    def create(live: bool) -> bool:
        node = _LockedNode("http://tiled/api/v1/metadata/run/primary", lock)
        run_writer.SeqNumOrderedNode(node, {}, _NoWait(), lock.lane(live=live)).create_appendable_table(
            schema, key="internal"
        )
        assert not lock.locked()
        return node.held[0]

    assert not create(live=False)
    assert not lock.recently(live=True, seconds=run_writer.LIVE_RECENT_S)
    assert create(live=True)
    assert lock.recently(live=True, seconds=run_writer.LIVE_RECENT_S)
    assert create(live=False)
    plain = _LockedNode("http://tiled/api/v1/metadata/run/primary", lock)
    run_writer.SeqNumOrderedNode(plain, {}, _NoWait(), threading.Lock()).create_appendable_table(
        schema, key="internal"
    )
    assert plain.held == [False]


@pytest.mark.parametrize("code", [400, 409, 502])
def test_a_table_create_refused_for_good_or_maybe_applied_is_not_retried(code: int) -> None:
    node = _Node("http://tiled/api/v1/metadata/run/primary", [http_error(code, "POST")])
    schema = pyarrow.schema([("seq_num", pyarrow.int64())])
    with pytest.raises(httpx.HTTPStatusError):
        run_writer.SeqNumOrderedNode(node, {}, _NoWait()).create_appendable_table(schema, key="internal")
    assert node.created == []


def test_a_conflict_after_a_failed_create_makes_the_table_unknown() -> None:
    """409 on the second attempt: the first landed after all, so the run is rewritten (`AppendAmbiguous`)."""
    node = _Node(
        "http://tiled/api/v1/metadata/run/primary", [http_error(500, "POST"), http_error(409, "POST")]
    )
    schema = pyarrow.schema([("seq_num", pyarrow.int64())])
    with pytest.raises(run_writer.AppendAmbiguous):
        run_writer.SeqNumOrderedNode(node, {}, _NoWait()).create_appendable_table(schema, key="internal")
