"""tiled_calls without a server: names from the spool never address another node.

`check_uid` is a full match (a trailing newline is refused, unlike a
``$``-anchored search); `check_key` refuses stream names and data keys
that would leave their path segment; every segment put into a read-back
URL is percent-quoted. The URL builder is exercised with a stand-in node
that has the one attribute it reads (``item["links"]["self"]``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from tiled_writer_sidecar.errors import UnsafeName
from tiled_writer_sidecar.upload.tiled_calls import (
    _table_url,
    check_key,
    check_uid,
    read_seq_nums,
    url_path,
)

GOOD_UIDS = ["0b5e7c4e-3a51-4cf6-9d3c-2f8f0d3e4a11", "scan.42", "a", "A:b-c_d.e"]
BAD_UIDS = [
    "0b5e7c4e-3a51-4cf6-9d3c-2f8f0d3e4a11\n",
    "../../evil",
    "a/b",
    "a..b",
    "",
    ".hidden",
    "a b",
    "a?x=1",
    "x" * 129,
    None,
    42,
]


@pytest.mark.parametrize("uid", GOOD_UIDS)
def test_ordinary_uids_pass(uid: str) -> None:
    assert check_uid(uid) == uid


@pytest.mark.parametrize("uid", BAD_UIDS, ids=repr)
def test_unsafe_uids_are_refused_with_the_uid_escaped(uid: object) -> None:
    """Full match: a trailing newline, separators, dot segments, query characters, non-strings."""
    with pytest.raises(UnsafeName) as info:
        check_uid(uid)
    assert "\n" not in str(info.value)


GOOD_KEYS = ["primary", "baseline", "det_stats1_total", "I0 (counts)", "motor.user_setpoint", "ü"]
BAD_KEYS = [
    "../other_run/primary",
    "..",
    ".",
    "a/b",
    "a\\b",
    "a?b",
    "a#b",
    "a%2Fb",
    "a\nb",
    "\x1b[2J",
    " x",
    "",
    None,
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_ordinary_stream_names_and_data_keys_pass(key: str) -> None:
    assert check_key(key, "stream name") == key


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_names_that_could_address_another_node_are_refused(key: object) -> None:
    with pytest.raises(UnsafeName, match="stream name"):
        check_key(key, "stream name")


def test_every_url_segment_is_quoted() -> None:
    """A segment stays one segment whatever it holds: ``/``, ``..``, ``?`` and ``#`` are escaped."""
    path = url_path("run", "../other_run/primary", "a?b#c", "internal")
    assert path.split("/") == ["run", "..%2Fother_run%2Fprimary", "a%3Fb%23c", "internal"]
    assert [unquote(s) for s in path.split("/")] == ["run", "../other_run/primary", "a?b#c", "internal"]


def test_the_read_back_url_keeps_a_hostile_stream_under_its_run() -> None:
    """What httpx sends for the table URL stays under the run's node (no dot segment is resolved)."""
    node = SimpleNamespace(item={"links": {"self": "http://127.0.0.1:8000/api/v1/metadata/container"}})
    url = httpx.URL(_table_url(node, "run-1", "../other_run/primary", "internal"))
    assert url.raw_path == b"/api/v1/table/full/container/run-1/..%2Fother_run%2Fprimary/internal"
    assert url.host == "127.0.0.1" and not url.query and not url.fragment


def test_read_seq_nums_refuses_an_unsafe_stream_before_any_request() -> None:
    """The client stand-in has no HTTP client at all: the refusal comes first."""
    with pytest.raises(UnsafeName):
        read_seq_nums(SimpleNamespace(), "run-1", "../other_run/primary")
    with pytest.raises(UnsafeName):
        read_seq_nums(SimpleNamespace(), "run-1\n", "primary")


def _arrow(**columns: list[int]) -> bytes:
    import io

    import pyarrow
    import pyarrow.ipc

    table = pyarrow.table(columns)
    sink = io.BytesIO()
    with pyarrow.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _tiled_stand_in(handler: Any) -> SimpleNamespace:
    """A client node with the two attributes the read-back uses, over an in-memory HTTP transport."""
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return SimpleNamespace(
        item={"links": {"self": "http://tiled/api/v1/metadata/beamline"}},
        context=SimpleNamespace(http_client=http),
    )


def test_a_split_table_is_read_back_from_the_part_that_holds_seq_num() -> None:
    """No ``internal``: one listing of the stream names the part with seq_num; only that part is read."""
    asked: list[str] = []

    def tiled(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path == "/api/v1/search/beamline/run-1/primary":
            parts = [
                ("internal_0", ["a", "b"]),
                ("internal_1", ["seq_num", "time"]),
                ("internal_2", ["ts_a"]),
            ]
            data = [{"id": key, "attributes": {"structure": {"columns": cols}}} for key, cols in parts]
            return httpx.Response(200, json={"data": data, "links": {"next": None}})
        if request.url.path == "/api/v1/table/full/beamline/run-1/primary/internal_1":
            assert request.url.params.get_list("column") == ["seq_num"]
            return httpx.Response(200, content=_arrow(seq_num=[1, 2, 3]))
        return httpx.Response(404)

    assert read_seq_nums(_tiled_stand_in(tiled), "run-1", "primary") == [1, 2, 3]
    assert asked == [
        "/api/v1/table/full/beamline/run-1/primary/internal",
        "/api/v1/search/beamline/run-1/primary",
        "/api/v1/table/full/beamline/run-1/primary/internal_1",
    ]


def test_a_stream_without_any_table_reads_back_as_none() -> None:
    def tiled(request: httpx.Request) -> httpx.Response:
        if "/search/" in request.url.path:
            return httpx.Response(200, json={"data": [{"id": "det", "attributes": {}}], "links": {}})
        return httpx.Response(404)

    assert read_seq_nums(_tiled_stand_in(tiled), "run-1", "primary") is None


# ----------------------------------------------------------------- close_stream: sent only when it can matter


class _Refused(Exception):
    pass


def _probe_stand_in(
    handler: Any, *, version: str = "0.2.20", self_link: str = "http://tiled/api/v1/metadata/a/b"
) -> SimpleNamespace:
    """A client node as `close_stream_matters` reads it: its link, server version, key and HTTP client."""
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return SimpleNamespace(
        item={"links": {"self": self_link}},
        context=SimpleNamespace(
            http_client=http, api_key="secret", server_info=SimpleNamespace(library_version=version)
        ),
    )


@pytest.fixture
def subscription(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What a WebSocket subscription gets: ``{"status": N}`` refused with HTTP N, ``None``: it opens."""
    import contextlib

    import websockets.sync.client
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response

    from tiled_writer_sidecar.upload import tiled_calls

    answer: dict[str, Any] = {"status": 500, "urls": []}

    @contextlib.contextmanager
    def connect(url: str, **kwargs: Any) -> Any:
        answer["urls"].append((url, kwargs["additional_headers"]))
        if answer["status"] is not None:
            raise InvalidStatus(Response(answer["status"], "refused", websockets.http11.Headers()))
        yield None

    monkeypatch.setattr(websockets.sync.client, "connect", connect)
    monkeypatch.setattr(tiled_calls, "_close_stream_findings", {})
    return answer


def _no_webhooks_api(request: httpx.Request) -> httpx.Response:
    return httpx.Response(404, json={"detail": "Not Found"})


def test_close_stream_is_skipped_only_without_streaming_cache_and_webhooks(
    subscription: dict[str, Any],
) -> None:
    """Subscription refused 500 (no streaming cache) and no webhooks API: close_stream does nothing; the
    subscription is tried on the node written into, with the API key."""
    from tiled_writer_sidecar.upload.tiled_calls import close_stream_matters

    assert close_stream_matters(_probe_stand_in(_no_webhooks_api)) is False
    assert subscription["urls"] == [
        ("ws://tiled/api/v1/stream/single/a/b", {"Authorization": "Apikey secret"})
    ]


@pytest.mark.parametrize("status", [None, 401, 403, 404, 502])
def test_close_stream_is_sent_when_a_subscription_opens_or_is_refused_otherwise(
    subscription: dict[str, Any], status: int | None
) -> None:
    """A streaming cache (the subscription opens), or any refusal that does not prove there is none."""
    from tiled_writer_sidecar.upload.tiled_calls import close_stream_matters

    subscription["status"] = status
    assert close_stream_matters(_probe_stand_in(_no_webhooks_api)) is True


@pytest.mark.parametrize("version", ["0.2.19", "0.3.0", "garbage", ""])
def test_close_stream_is_sent_to_a_tiled_whose_close_stream_was_not_read(
    subscription: dict[str, Any], version: str
) -> None:
    from tiled_writer_sidecar.upload.tiled_calls import close_stream_matters

    assert close_stream_matters(_probe_stand_in(_no_webhooks_api, version=version)) is True
    assert subscription["urls"] == []  # nothing asked


def test_close_stream_is_sent_when_a_webhook_is_registered_on_the_node_or_an_ancestor(
    subscription: dict[str, Any],
) -> None:
    """With the webhooks API mounted, every node from the one written into up to the root is listed."""
    from tiled_writer_sidecar.upload import tiled_calls

    hooks: dict[str, list[Any]] = {"a/b": [], "a": [], "": []}
    asked: list[str] = []

    def tiled(request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1/webhooks/target/")
        asked.append(path)
        return httpx.Response(200, json=hooks[path])

    assert tiled_calls.close_stream_matters(_probe_stand_in(tiled)) is False
    assert asked == ["a/b", "a", ""]
    hooks[""] = [{"id": 1}]
    tiled_calls._close_stream_findings.clear()
    assert tiled_calls.close_stream_matters(_probe_stand_in(tiled)) is True


def test_a_finding_is_kept_for_a_while_then_checked_again(
    subscription: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiled_writer_sidecar.upload import tiled_calls

    now = [1000.0]
    monkeypatch.setattr(tiled_calls.time, "monotonic", lambda: now[0])
    node = _probe_stand_in(_no_webhooks_api)
    assert tiled_calls.close_stream_matters(node) is False
    subscription["status"] = None  # Tiled restarted with a streaming cache
    assert tiled_calls.close_stream_matters(node) is False and len(subscription["urls"]) == 1
    now[0] += tiled_calls.CLOSE_STREAM_RECHECK_S
    assert tiled_calls.close_stream_matters(node) is True and len(subscription["urls"]) == 2


def test_a_real_tiled_without_streaming_cache_needs_no_close_stream(tiled_container: Any) -> None:
    """`tiled serve catalog` (no streaming cache, no webhooks): the probe finds close_stream does nothing."""
    from tiled.client import from_uri

    from tiled_writer_sidecar.upload import tiled_calls

    tiled_calls._close_stream_findings.pop(tiled_container.uri, None)
    client = from_uri(tiled_container.uri, api_key=tiled_container.api_key)
    try:
        assert tiled_calls.close_stream_matters(client) is False
    finally:
        client.context.close()


@pytest.mark.process
@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
@pytest.mark.filterwarnings(  # tiled's own thread, ending after "closed" (docs/upstream.md)
    "ignore:Exception in thread tiled-subscription-:pytest.PytestUnhandledThreadExceptionWarning"
)
@pytest.mark.parametrize("placeholder", [True, False], ids=["placeholder", "none"])
def test_a_node_deleted_and_created_again_streams_afresh_only_behind_a_placeholder(
    placeholder: bool, tmp_path: Path
) -> None:
    """On Tiled with SQLite and a streaming cache, a table closed, deleted and created again at the same path.

    Behind `ids_not_reused` the new table has an id of its own: a subscriber
    replaying it from the start gets its rows only, Tiled's sequence numbers
    from 1, and no end of stream. Without it (what the sidecar did before) the
    new table takes the deleted one's id and, with it, the deleted one's
    records: the old rows, then "closed", and nothing of the new table. The
    second case documents tiled 0.2.20 (docs/upstream.md): when it fails,
    Tiled stopped reusing ids and the placeholder can go.
    """
    import pyarrow

    from tiled_writer_sidecar.testing import TiledServer, wait_until
    from tiled_writer_sidecar.upload.tiled_calls import ids_not_reused

    schema = pyarrow.schema([("seq_num", pyarrow.int64())])
    with TiledServer(tmp_path / "tiled", streaming_cache="memory") as tiled:
        client = tiled.client()
        run = client.create_container("run")
        table = run.create_appendable_table(schema, key="internal")
        for n in (1, 2, 3):
            table.append_partition(0, pyarrow.table({"seq_num": [n]}))
        guard = ids_not_reused(run, "internal") if placeholder else contextlib.nullcontext()
        with guard:
            table.close_stream()
            run.delete_contents("internal", external_only=False)
            table = run.create_appendable_table(schema, key="internal")
        assert list(run) == ["internal"]  # the placeholder is gone
        rows: list[tuple[int, list[int]]] = []
        closed: list[bool] = []

        def on_rows(update: Any) -> None:
            rows.append((update.sequence, update.data()["seq_num"].tolist()))

        def on_closed(_: Any) -> None:
            closed.append(True)

        subscription = table.subscribe()
        subscription.new_data.add_callback(on_rows)
        subscription.stream_closed.add_callback(on_closed)
        subscription.start_in_thread(0)
        try:
            for n in (10, 11):
                table.append_partition(0, pyarrow.table({"seq_num": [n]}))
            if placeholder:
                wait_until(lambda: len(rows) >= 2, 60, what="the new table's rows")
                assert rows == [(1, [10]), (2, [11])] and not closed
            else:
                wait_until(lambda: closed, 60, what="the inherited end of stream")
                assert rows == [(1, [1]), (2, [2]), (3, [3])]
        finally:
            subscription.disconnect(wait=False)
