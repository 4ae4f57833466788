"""The daemon's HTTP endpoint: Prometheus ``/metrics`` and ``/healthz``.

Served from a thread of the receiver process. Nothing is computed on the
receive path: a custom collector reads the receiver's plain counters
(`stats.ReceiverStats`), the uploader's ``uploader.json`` and the spool's
per-run files when scraped. ``/healthz`` serves `health.health_snapshot`:
200 while the sidecar can receive and spool, 503 with the reasons when it
cannot. Clients never cost the receiver its descriptors: at most
`MAX_CONNECTIONS` at once, each dropped after `CONNECTION_TIMEOUT_S` of
silence or `CONNECTION_DEADLINE_S` in all (`_BoundedHTTPServer`).

The lag histogram (``event_to_tiled_seconds``) is cumulative, as Prometheus
needs for ``rate()`` and ``histogram_quantile``: `LagHistogram` adds only what
is new in each ``uploader.json`` it reads, so no bucket ever goes down while
this process lives. It reads, in order of preference, ``lag_histogram``
(cumulative buckets kept by the uploader, `LagHistogram.as_status`; a
decrease means the uploader restarted) or today's ``lag_seconds`` list (the
last 1000 samples: the new ones are those after the longest overlap with
the list read before).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeGuard

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .health import NO_UPLOADER_YET, health_snapshot
from .spool.directory import SpoolDir
from .spool.index import UploaderStatus
from .stats import ReceiverStats

log = logging.getLogger(__name__)

#: Connections served at once; more wait in the listen queue (no descriptor of ours meanwhile).
MAX_CONNECTIONS = 8
#: A client silent this long (per read or write) is dropped: half-sent requests hold nothing for long.
CONNECTION_TIMEOUT_S = 5.0
#: ... and hung up this long after it connected, however it trickles.
CONNECTION_DEADLINE_S = 15.0
#: After a failed accept (no descriptor left), the endpoint waits this long before the next one.
ACCEPT_PAUSE_S = 0.5

LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class LagHistogram:
    """Cumulative lag histogram: counts per `LAG_BUCKETS` bound (+Inf last), sum, count.

    The uploader can keep one (`observe` each sample, `as_status` into
    ``uploader.json`` as ``lag_histogram``); the metrics server keeps one per
    process and feeds it each ``uploader.json`` it reads (`update`).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets = [0] * (len(LAG_BUCKETS) + 1)  # cumulative: samples <= bound; last is +Inf
        self.sum = 0.0
        self.count = 0
        self._seen_status: tuple[list[int], float] | None = None  # last `lag_histogram` read
        self._seen_samples: list[float] = []  # last `lag_seconds` list read

    def observe(self, seconds: float) -> None:
        """Add one sample (ignored unless it is a finite number)."""
        if not _finite(seconds):
            return
        with self.lock:
            for i, bound in enumerate(LAG_BUCKETS):
                if seconds <= bound:
                    self.buckets[i] += 1
            self.buckets[-1] += 1
            self.sum += seconds
            self.count += 1

    def as_status(self) -> dict[str, Any]:
        """The histogram as ``uploader.json`` carries it (field ``lag_histogram``)."""
        with self.lock:
            return {"bounds": list(LAG_BUCKETS), "buckets": list(self.buckets), "sum": self.sum}

    def update(self, uploader: dict[str, Any]) -> None:
        """Add what is new in one read of ``uploader.json`` (see the module docstring)."""
        status = _histogram_status(uploader.get("lag_histogram"))
        if status is not None:
            self._add_status(*status)
            return
        samples = uploader.get("lag_seconds")
        if isinstance(samples, list):
            for sample in self._new_samples([x for x in samples if _finite(x)]):
                self.observe(sample)

    def _add_status(self, buckets: list[int], total: float) -> None:
        seen = self._seen_status
        self._seen_status = (buckets, total)
        if seen is not None and all(now >= before for now, before in zip(buckets, seen[0], strict=True)):
            delta = [now - before for now, before in zip(buckets, seen[0], strict=True)]
            delta_sum = total - seen[1]
        else:  # first read, or the uploader restarted: all of it is new
            delta, delta_sum = buckets, total
        with self.lock:
            self.buckets = [a + b for a, b in zip(self.buckets, delta, strict=True)]
            self.sum += max(0.0, delta_sum)
            self.count = self.buckets[-1]

    def _new_samples(self, samples: list[float]) -> list[float]:
        """The tail of `samples` not read before: after the longest overlap with the last read."""
        before, self._seen_samples = self._seen_samples, samples
        first = samples[0] if samples else None
        for start in range(len(before)):  # the earliest start gives the longest overlap
            if before[start] == first:
                overlap = before[start:]
                if samples[: len(overlap)] == overlap:
                    return samples[len(overlap) :]
        return samples  # no overlap: the uploader restarted (or more than 1000 came since)

    def buckets_for_prometheus(self) -> tuple[list[tuple[str, float]], float]:
        with self.lock:
            bounds = [str(b) for b in LAG_BUCKETS] + ["+Inf"]
            return list(zip(bounds, map(float, self.buckets), strict=True)), self.sum


def _finite(value: Any) -> TypeGuard[float]:
    """A real number that fits a float and is finite (not a bool, NaN, inf or 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _histogram_status(value: Any) -> tuple[list[int], float] | None:
    """``(buckets, sum)`` from a ``lag_histogram`` field, or None if absent or not ours."""
    if not isinstance(value, dict) or value.get("bounds") != list(LAG_BUCKETS):
        return None
    buckets, total = value.get("buckets"), value.get("sum")
    if (
        not isinstance(buckets, list)
        or len(buckets) != len(LAG_BUCKETS) + 1
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63 for n in buckets)
        or not _finite(total)
    ):
        return None
    return buckets, float(total)


class SidecarCollector(Collector):
    def __init__(self, stats: ReceiverStats, spool: SpoolDir) -> None:
        self.stats = stats
        self.spool = spool
        self.lag = LagHistogram()
        self._update_lock = threading.Lock()  # one scrape at a time reads what is new

    def collect(self) -> Iterator[Any]:
        s = self.stats
        p = "tiled_writer_sidecar"
        docs = CounterMetricFamily(f"{p}_documents_received", "Documents spooled, by kind", labels=["kind"])
        for kind, n in s.documents.items():
            docs.add_metric([kind], n)
        yield docs
        rejected = CounterMetricFamily(
            f"{p}_messages_rejected", "Messages rejected, by reason", labels=["reason"]
        )
        for reason, n in s.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily(f"{p}_messages_received", "Messages read from 0MQ", value=s.messages)
        yield CounterMetricFamily(f"{p}_received_bytes", "Bytes read from 0MQ", value=s.bytes)
        yield CounterMetricFamily(f"{p}_gap_events", "Events missing (seq_num holes)", value=s.gaps)
        yield CounterMetricFamily(f"{p}_documents_dropped", "Documents dropped: spool full", value=s.dropped)
        yield GaugeMetricFamily(f"{p}_spool_bytes", "Bytes in spool segments", value=s.spool_bytes)
        yield GaugeMetricFamily(
            f"{p}_spool_segments", "Spool segment files", value=self.spool.segment_count()
        )
        yield GaugeMetricFamily(
            f"{p}_spool_writable", "1 if the spool accepts writes", value=int(s.spool_writable)
        )
        spool = health_snapshot(s, self.spool, time.time()).spool
        yield GaugeMetricFamily(
            f"{p}_backlog_documents", "Documents not yet in Tiled", value=spool.backlog_documents
        )
        yield GaugeMetricFamily(f"{p}_backlog_runs", "Runs not yet fully in Tiled", value=spool.backlog_runs)
        yield GaugeMetricFamily(
            f"{p}_oldest_unuploaded_age_seconds",
            "Age of the oldest run not yet fully in Tiled",
            value=spool.oldest_unuploaded_age_seconds or 0.0,
        )
        loaded = UploaderStatus.load(self.spool.root)
        uploader = loaded or NO_UPLOADER_YET
        yield GaugeMetricFamily(
            f"{p}_tiled_up", "1 if the uploader reaches Tiled", value=int(uploader.tiled == "up")
        )
        yield CounterMetricFamily(f"{p}_uploaded_documents", "Documents uploaded", value=uploader.documents)
        yield CounterMetricFamily(f"{p}_uploaded_rows", "Event rows uploaded", value=uploader.rows)
        yield CounterMetricFamily(f"{p}_runs_uploaded", "Runs uploaded", value=uploader.runs_uploaded)
        yield CounterMetricFamily(
            f"{p}_runs_quarantined", "Runs quarantined", value=uploader.runs_quarantined
        )
        yield CounterMetricFamily(f"{p}_upload_retries", "Upload failures retried", value=uploader.retries)
        yield CounterMetricFamily(f"{p}_upload_flushes", "Batches flushed to Tiled", value=uploader.flushes)
        if loaded is not None:
            with self._update_lock:
                self.lag.update(loaded.plain())
        buckets, lag_sum = self.lag.buckets_for_prometheus()
        yield HistogramMetricFamily(
            f"{p}_event_to_tiled_seconds",
            "Event time to readable in Tiled, per flushed batch (oldest row)",
            buckets=buckets,
            sum_value=lag_sum,
        )


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `MAX_CONNECTIONS` at once, each `CONNECTION_TIMEOUT_S` per read.

    When all are busy the next connection waits in the kernel's listen queue
    (it costs this process no descriptor). A failed accept (no descriptor
    left) is logged once per episode and retried after `ACCEPT_PAUSE_S`, not
    in a busy loop; a client that goes away is one log line, no traceback.
    """

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._accept_failing = False
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            request = super().get_request()
        except OSError as err:
            if not self._accept_failing:
                log.warning("metrics endpoint cannot accept a connection (%s); pausing", err.strerror or err)
            self._accept_failing = True
            time.sleep(ACCEPT_PAUSE_S)
            raise
        if self._accept_failing:
            log.info("metrics endpoint accepts connections again")
        self._accept_failing = False
        return request

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # no accept while MAX_CONNECTIONS are served (see the class docstring)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        gone = isinstance(error, (BrokenPipeError, ConnectionResetError, TimeoutError))  # the client's doing
        log.log(
            logging.DEBUG if gone else logging.INFO,
            "metrics client %s: %s",
            client_address[0] if client_address else "?",
            _one_line(error),
        )


def _hang_up(connection: socket.socket) -> None:
    """End a connection past its deadline: its thread's next read or write fails at once."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return "connection failed"
    text = str(error).splitlines()[0][:120] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class MetricsServer:
    """Serves /metrics and /healthz on `address` ("host:port") in a thread (`_BoundedHTTPServer`)."""

    def __init__(self, address: str, stats: ReceiverStats, spool: SpoolDir) -> None:
        host, _, port = address.rpartition(":")
        registry = CollectorRegistry()
        registry.register(SidecarCollector(stats, spool))
        self.loop_beat = time.time()
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = CONNECTION_TIMEOUT_S

            def setup(self) -> None:
                super().setup()
                self._deadline = threading.Timer(CONNECTION_DEADLINE_S, _hang_up, (self.connection,))
                self._deadline.daemon = True
                self._deadline.start()

            def finish(self) -> None:
                self._deadline.cancel()
                super().finish()

            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path.startswith("/healthz"):
                    snapshot = health_snapshot(stats, spool, server.loop_beat)
                    body = json.dumps(snapshot.as_dict()).encode()
                    ctype, code = "application/json", 200 if snapshot.healthy else 503
                else:
                    body, ctype, code = b"not found: try /metrics or /healthz\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.httpd = _BoundedHTTPServer((host or "127.0.0.1", int(port)), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
