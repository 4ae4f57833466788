"""Live consumers: Tiled's streaming subscribers see every row while the scan runs.

Real components only: Tiled serving its catalog with a streaming cache
(in memory, and Debian's ``redis-server`` started here on a free port),
bluesky's own proxy, the sidecar daemon with its default batching, a
RunEngine publishing through bluesky's Publisher, and bluesky-tiled-plugins'
``subscribe_to_streams`` as the consumer (`testing.tiled_server.LiveSubscriber`
records what it delivers, with Tiled's per-node sequence numbers).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import pytest
from ophyd.sim import SynSignal, det

from tiled_writer_sidecar.config import TiledConfig
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledServer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.sidecar import SidecarProcess, sidecar_command, spool_documents
from tiled_writer_sidecar.testing.tiled_server import LiveSubscriber, RedisServer, redis_server_command

# tiled 0.2.20's subscription threads open their WebSockets with websockets' deprecated direct
# connect(); under filterwarnings=error that warning would kill them silently. Those threads also
# end with an exception of their own when a subscription is let go of while it reconnects ("Cannot
# be restarted once stopped") or its node was deleted (404 on reconnecting): docs/upstream.md. Only
# tiled's own threads are excused; every row the subscriber holds is still checked by each test.
pytestmark = [
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception in thread tiled-subscription-:pytest.PytestUnhandledThreadExceptionWarning"
    ),
]

#: The sidecar's own default, so these tests run with default settings.
DEFAULT_BATCH_SECONDS = TiledConfig().batch_seconds

needs_redis = pytest.mark.skipif(redis_server_command() is None, reason="redis-server not installed")
CACHES = ["memory", pytest.param("redis", marks=needs_redis)]


def _tiled(directory: Path, cache: str, redis_dir: Path) -> Iterator[TiledServer]:
    if cache == "memory":
        with TiledServer(directory, streaming_cache="memory") as tiled:
            yield tiled
    else:
        with RedisServer(redis_dir) as redis, TiledServer(directory, streaming_cache=redis.uri) as tiled:
            yield tiled


@pytest.fixture(scope="module", params=CACHES)
def streaming_tiled(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TiledServer]:
    """One streaming Tiled per cache kind for the tests that never stop it."""
    base = tmp_path_factory.mktemp(f"live-{request.param}")
    yield from _tiled(base / "tiled", request.param, base / "redis")


def _sidecar(tmp_path: Path, proxy: ZmqProxy, tiled: TiledServer, **tiled_settings: Any) -> SidecarProcess:
    settings = {"tiled": {"batch_seconds": DEFAULT_BATCH_SECONDS, **tiled_settings}}
    return SidecarProcess(
        tmp_path / "sidecar",
        zmq_address=proxy.out_address,
        tiled_uri=tiled.uri,
        api_key=tiled.api_key,
        settings=settings,
    )


@contextlib.contextmanager
def _logs_on_failure(
    sidecar: SidecarProcess, tiled: TiledServer, subscriber: LiveSubscriber
) -> Iterator[None]:
    """If the block fails, print what the subscriber saw and the ends of the sidecar's and Tiled's logs."""
    try:
        yield
    except BaseException:
        print(
            f"subscriber: rewrites {subscriber.rewrites}, resyncs {subscriber.resyncs},"
            f" closed {subscriber.closed}\n---- sidecar log ----\n{sidecar.log_tail(120)}"
            f"\n---- tiled log ----\n{tiled.log_tail(120)}"
        )
        raise


def _wait_rows(subscriber: LiveSubscriber, uid: str, n: int, timeout: float = 120.0) -> None:
    wait_until(
        lambda: len(subscriber.seq_nums(uid)) >= n, timeout, what=f"{n} rows of {uid} at the subscriber"
    )


@pytest.mark.timeout(900)  # Tiled, the proxy and the sidecar start cold on a loaded 2-core machine
def test_rows_stream_live_exactly_once_and_streams_close(
    streaming_tiled: TiledServer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """With default settings a 10 Hz scan's rows reach a subscriber while it runs, each exactly once.

    The first row arrives before the scan ends (the table exists from the
    first event); Tiled's sequence numbers of the table run 1..k without a
    gap or a repeat, the rows are seq_num 1..40 once each; after the run,
    the table, the stream and the run are closed (stream_closed).
    """
    subscriber = LiveSubscriber(streaming_tiled.client())
    try:
        with _sidecar(tmp_path, proxy, streaming_tiled) as sidecar:
            acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
            sidecar.wait_uploader_connected()
            (uid,) = acquisition.run(bp.count([det], 40, delay=0.1))
            scan_ended = time.time()
            sidecar.wait_drained([uid])
            _wait_rows(subscriber, uid, 40)
            wait_until(
                lambda: len(subscriber.closed_for(uid)) >= 3, 60, what="stream_closed of table, stream, run"
            )
        arrivals = subscriber.arrivals(uid)
        assert min(arrivals) < scan_ended, "the first row reached the subscriber only after the scan"
        assert sum(a < scan_ended for a in arrivals) >= 20, (
            f"only {sum(a < scan_ended for a in arrivals)} live"
        )
        assert subscriber.problems(uid, 40) == []
        closed = subscriber.closed_for(uid)
        assert any(uri.endswith("/primary/internal") for uri in closed), closed
        assert any(uri.endswith("/primary") for uri in closed), closed
        assert any(uri.endswith(uid) for uri in closed), closed
    finally:
        subscriber.disconnect()


@pytest.mark.timeout(900)
def test_a_run_closed_as_incomplete_is_closed_in_tiled(
    streaming_tiled: TiledServer, acquisition: Acquisition, tmp_path: Path
) -> None:
    """A run whose stop never came is uploaded as `incomplete` and its streams are closed all the same."""
    (uid,) = acquisition.run(bp.count([det], 5))
    documents = [(name, doc) for name, doc in acquisition.documents if name != "stop"]
    spool = tmp_path / "spool"
    spool_documents(spool, documents)
    subscriber = LiveSubscriber(streaming_tiled.client())
    try:
        env = {**os.environ, "TILED_API_KEY": streaming_tiled.api_key}
        replay = subprocess.run(
            [*sidecar_command(), "replay", "--spool-dir", str(spool), "--tiled-uri", streaming_tiled.uri],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        wait_until(
            lambda: len(subscriber.closed_for(uid)) >= 3, 60, what="stream_closed of the incomplete run"
        )
        assert subscriber.seq_nums(uid) == [1, 2, 3, 4, 5]
    finally:
        subscriber.disconnect()


@pytest.mark.timeout(900)
def test_a_rewritten_run_is_announced_again_and_ends_with_the_run(
    streaming_tiled: TiledServer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """The uploader is killed mid-run, so the run is deleted and rewritten from its first row.

    The live subscriber sees the run created a second time (a rewrite, not
    new data), drops what it held of it and follows the new nodes (it
    releases closed subscriptions, which bluesky-tiled-plugins 2.0.12's
    `subscribe_to_streams` does not: docs/upstream.md). The new nodes have
    ids of their own, so they stream afresh. It ends with exactly the run's
    30 rows, and so does a subscriber that connects afterwards, as
    docs/operations.md tells a stock subscriber to do.
    """
    subscriber = LiveSubscriber(streaming_tiled.client())
    reconnected: LiveSubscriber | None = None
    killed = threading.Event()
    try:
        with _sidecar(tmp_path, proxy, streaming_tiled) as sidecar:
            acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
            sidecar.wait_uploader_connected()

            def kill_at_row_10(name: str, doc: dict[str, Any]) -> None:
                if name == "event" and doc["seq_num"] == 10 and not killed.is_set():
                    wait_until(lambda: len(subscriber.seq_nums(doc_uid[0])) >= 1, 60, what="a first live row")
                    sidecar.kill_uploader()
                    killed.set()

            doc_uid: list[str] = []
            acquisition.subscribe(lambda n, d: doc_uid.append(d["uid"]) if n == "start" else None)
            acquisition.subscribe(kill_at_row_10)
            (uid,) = acquisition.run(bp.count([det], 30, delay=0.1))
            assert killed.is_set()
            sidecar.wait_drained([uid], timeout=300)
            wait_until(lambda: subscriber.rewrites.get(uid, 0) >= 1, 120, what="the rewrite announced")
            _wait_rows(subscriber, uid, 30)  # it followed the rewritten run's new nodes
            reconnected = LiveSubscriber(streaming_tiled.client())
            _wait_rows(reconnected, uid, 30)
        # Keyed by seq_num each holds exactly the run's rows. (Tiled's stream history for the table's
        # path still holds the deleted upload's records, so a reconnect may be sent rows twice.)
        assert subscriber.seq_nums(uid) == list(range(1, 31))
        assert reconnected.seq_nums(uid) == list(range(1, 31))
    finally:
        subscriber.disconnect()
        if reconnected is not None:
            reconnected.disconnect()


def _rows_held(subscriber: LiveSubscriber, acquisition: Acquisition) -> int:
    """Rows the subscriber holds of the last run started (0 before its start)."""
    starts = [doc["uid"] for name, doc in acquisition.documents if name == "start"]
    return len(subscriber.seq_nums(starts[-1])) if starts else 0


def _scan_while(acquisition: Acquisition, wait: Any, device: Any = det) -> tuple[str, int]:
    """Scan `device` at 10 Hz until `wait()`, run in a thread, returns or fails; the run's uid and events."""
    done = threading.Event()

    def watch() -> None:
        try:
            wait()
        finally:
            done.set()

    thread = threading.Thread(target=watch)
    thread.start()
    (uid,) = acquisition.run(_until(done, device))
    thread.join()
    return uid, max(doc["seq_num"] for name, doc in acquisition.documents if name == "event")


def _until(flag: threading.Event, device: Any = det) -> Any:
    """A run of `device` readings at 10 Hz until `flag` is set."""

    def inner() -> Any:
        while not flag.is_set():
            yield from bps.trigger_and_read([device])
            yield from bps.sleep(0.1)

    return bpp.run_wrapper(bpp.stage_wrapper(inner(), [device]), md={"plan_name": "until"})


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("cache", CACHES)
def test_tiled_restart_mid_run(cache: str, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path) -> None:
    """Tiled stops mid-run and comes back while the scan goes on: the subscriber ends with exactly the run.

    Its subscriptions reconnect by themselves. With Redis the streams' records
    outlive Tiled and are replayed from where the subscriber was; with the
    memory cache they are gone and the sequence numbers start again at 1, so
    the subscriber sees them go backwards and reads the missed rows over
    HTTP. Either way every row of the run is held exactly once at the end.
    """
    tiled_gen = _tiled(tmp_path / "tiled", cache, tmp_path / "redis")
    tiled = next(tiled_gen)
    subscriber = LiveSubscriber(tiled.client())
    restarted = threading.Event()
    try:
        with _sidecar(tmp_path, proxy, tiled) as sidecar, _logs_on_failure(sidecar, tiled, subscriber):
            acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
            sidecar.wait_uploader_connected()

            def outage() -> None:
                wait_until(lambda: _rows_held(subscriber, acquisition) > 0, 120, what="first live rows")
                tiled.stop()
                tiled.start()
                restarted.set()
                # The scan goes on until the subscriber's connection is back (it retries with
                # a backoff of up to 45 s) and rows flow to it again.
                held = _rows_held(subscriber, acquisition)
                wait_until(
                    lambda: _rows_held(subscriber, acquisition) >= held + 10,
                    240,
                    what="rows reaching the subscriber after the restart",
                )

            uid, n = _scan_while(acquisition, outage)
            assert restarted.is_set()
            sidecar.wait_drained([uid], timeout=300)
            _wait_rows(subscriber, uid, n, timeout=180)
        assert subscriber.seq_nums(uid) == list(range(1, n + 1))
        if cache == "memory":
            assert subscriber.resyncs.get((uid, "primary"), 0) >= 1  # it had to read what it missed
    finally:
        subscriber.disconnect()
        tiled_gen.close()


#: Rows of `counter` read as integers before it turns to floats (the table is widened then).
INT_ROWS = 5
#: Rows that must reach the subscriber after the widening, while the scan still runs.
ROWS_AFTER_WIDENING = 10


@pytest.mark.timeout(900)
def test_rows_after_a_column_widens_mid_run_still_stream_live(
    streaming_tiled: TiledServer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """A counter that reads integers and then floats: the table is rewritten wider, and rows go on streaming.

    The sidecar replaces the int64 table with a float64 one (same path, a new
    node). The subscriber sees the old table closed and follows the new one:
    the rows after the widening reach it while the scan still runs, and it
    ends with every row once. On a Tiled whose SQLite catalog hands a deleted
    node's id to the next node, the new table must not inherit the old one's
    closed stream (docs/upstream.md).
    """
    readings = iter(range(1, 1_000_000))

    def counter_value() -> float:
        n = next(readings)
        return n if n <= INT_ROWS else n + 0.5

    counter = SynSignal(func=counter_value, name="counter")
    subscriber = LiveSubscriber(streaming_tiled.client())
    try:
        with (
            _sidecar(tmp_path, proxy, streaming_tiled) as sidecar,
            _logs_on_failure(sidecar, streaming_tiled, subscriber),
        ):
            acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
            sidecar.wait_uploader_connected()

            def widened_and_streaming() -> None:
                wait_until(
                    lambda: _rows_held(subscriber, acquisition) >= INT_ROWS + ROWS_AFTER_WIDENING,
                    240,
                    what="rows after the widening at the subscriber",
                )

            uid, n = _scan_while(acquisition, widened_and_streaming, counter)
            live = subscriber.seq_nums(uid)
            sidecar.wait_drained([uid], timeout=300)
            _wait_rows(subscriber, uid, n)
        assert len(live) >= INT_ROWS + ROWS_AFTER_WIDENING, f"only {len(live)} rows live of {n}"
        assert subscriber.seq_nums(uid) == list(range(1, n + 1))
        assert streaming_tiled.client()[uid]["primary"]["counter"].read().dtype == "float64"
    finally:
        subscriber.disconnect()
