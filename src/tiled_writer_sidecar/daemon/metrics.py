"""The daemon's HTTP endpoint: Prometheus ``/metrics`` and ``/healthz``.

Served from a thread of the receiver process. Nothing is computed on the
receive path: a custom collector reads the receiver's plain counters
(`counters.ReceiverStats`), the uploader's ``uploader.json`` and the spool's
per-run files when scraped. ``/healthz`` serves `health.health_snapshot`:
200 while the sidecar can receive and spool, 503 with the reasons when it
cannot. Clients never cost the receiver its descriptors: at most
`MAX_CONNECTIONS` at once, the rest refused (`http_server.BoundedHTTPServer`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tiled_writer_sidecar.address import host_port
from tiled_writer_sidecar.daemon.health import NO_UPLOADER_YET, health_snapshot
from tiled_writer_sidecar.errors import ConfigError
from tiled_writer_sidecar.http_server import BoundedHTTPServer
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.lag import LagHistogram
from tiled_writer_sidecar.spool.state_files import UploaderStatus
from tiled_writer_sidecar.states import (
    TILED_STATES,
    Rejection,
    TiledState,
    counted,
)

PREFIX = "tiled_writer_sidecar"

#: Connections served at once; more are refused (`http_server`).
MAX_CONNECTIONS = 8


def known_rejections() -> tuple[str, ...]:
    """The rejection reasons `/metrics` exports from the start, at 0 (so `increase(...) > 0` sees the
    first): every `Rejection` the receiver counts (another publisher's messages it ignores). A reason
    outside the enum (``internal-error:<Type>``) is exported too, from its first occurrence."""
    return tuple(r for r in Rejection if counted(r))


def _labelled(
    family: CounterMetricFamily, known: tuple[str, ...], counts: Mapping[str, int]
) -> CounterMetricFamily:
    """`family` with one sample per known label (0 until counted) and one per other label counted."""
    for label in dict.fromkeys([*known, *counts]):
        family.add_metric([label], counts.get(label, 0))
    return family


def uploader_pid(spool: SpoolDir) -> str | None:
    """The pid of the process holding the spool's uploader lock (it writes its pid there), or None."""
    if not spool.is_locked("uploader"):
        return None
    try:
        with open(spool.root / "uploader.lock", "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if text.isdigit() and 0 < int(text) < 2**22 else None


class SidecarCollector(Collector):
    """Every sidecar metric, read at scrape time (see the module docstring); names in docs/operations.md."""

    def __init__(self, stats: ReceiverStats, spool: SpoolDir) -> None:
        from prometheus_client.process_collector import ProcessCollector

        from tiled_writer_sidecar import __version__

        self.stats = stats
        self.spool = spool
        self.version = __version__
        self.lag = LagHistogram()
        self._update_lock = threading.Lock()  # one scrape at a time reads what is new
        self._receiver_process = ProcessCollector(namespace=f"{PREFIX}_receiver", registry=None)
        self._uploader_pid = "0"  # set before each collect of the uploader's process metrics
        self._uploader_process = ProcessCollector(
            namespace=f"{PREFIX}_uploader", pid=lambda: self._uploader_pid, registry=None
        )

    def collect(self) -> Iterator[Any]:
        from tiled_writer_sidecar.documents.wire import DOCUMENT_NAMES

        s = self.stats
        p = PREFIX
        info = GaugeMetricFamily(f"{p}_build_info", "Always 1: the version running", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        yield _labelled(
            CounterMetricFamily(f"{p}_documents_received", "Documents spooled, by kind", labels=["kind"]),
            tuple(sorted(DOCUMENT_NAMES)),
            s.documents,
        )
        yield _labelled(
            CounterMetricFamily(f"{p}_messages_rejected", "Messages rejected, by reason", labels=["reason"]),
            known_rejections(),
            s.rejected,
        )
        yield CounterMetricFamily(f"{p}_messages_received", "Messages read from 0MQ", value=s.messages)
        yield CounterMetricFamily(f"{p}_received_bytes", "Bytes read from 0MQ", value=s.bytes)
        yield CounterMetricFamily(
            f"{p}_gap_events",
            "Events missing in closed runs: seq_num holes and stop.num_events shortfalls",
            value=s.gaps,
        )
        yield CounterMetricFamily(
            f"{p}_runs_stop_missing", "Runs closed without their stop", value=s.runs_stop_missing
        )
        yield GaugeMetricFamily(
            f"{p}_runs_start_missing",
            "Runs held as orphans: documents spooled, start never received",
            value=s.orphan_runs,
        )
        yield CounterMetricFamily(
            f"{p}_orphan_runs",
            "Orphan runs opened (a document of a run whose start is missing)",
            value=s.orphan_runs_total,
        )
        yield CounterMetricFamily(
            f"{p}_orphan_documents", "Documents spooled into orphans", value=s.orphan_documents
        )
        yield CounterMetricFamily(
            f"{p}_events_out_of_order",
            "Late events kept (their seq_num filled a hole)",
            value=s.events_out_of_order,
        )
        yield CounterMetricFamily(f"{p}_documents_dropped", "Documents dropped: spool full", value=s.dropped)
        yield GaugeMetricFamily(
            f"{p}_proxy_connected",
            "1 while the subscription is connected to the proxy",
            value=int(s.connected),
        )
        yield GaugeMetricFamily(f"{p}_spool_bytes", "Bytes in spool segments", value=s.spool_bytes)
        segments = s.spool_segments if s.spool_segments is not None else self.spool.segment_count()
        yield GaugeMetricFamily(f"{p}_spool_segments", "Spool segment files", value=segments)
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
            f"{p}_tiled_up", "1 if the uploader reaches Tiled", value=int(uploader.tiled == TiledState.UP)
        )
        state = uploader.tiled if uploader.tiled in TILED_STATES else TiledState.CONNECTING
        states = GaugeMetricFamily(
            f"{p}_tiled_state",
            "1 for Tiled's state as the uploader sees it, 0 for the others",
            labels=["state"],
        )
        for name in TILED_STATES:
            states.add_metric([name], int(name == state))
        yield states
        yield CounterMetricFamily(f"{p}_uploaded_documents", "Documents uploaded", value=uploader.documents)
        yield CounterMetricFamily(f"{p}_uploaded_rows", "Event rows uploaded", value=uploader.rows)
        yield CounterMetricFamily(f"{p}_runs_uploaded", "Runs uploaded", value=uploader.runs_uploaded)
        yield CounterMetricFamily(
            f"{p}_runs_quarantined", "Runs quarantined", value=uploader.runs_quarantined
        )
        yield CounterMetricFamily(f"{p}_upload_retries", "Upload failures retried", value=uploader.retries)
        yield CounterMetricFamily(f"{p}_upload_flushes", "Batches flushed to Tiled", value=uploader.flushes)
        yield GaugeMetricFamily(
            f"{p}_upload_runs_per_second",
            "Runs uploaded per second over the last minute",
            value=uploader.runs_per_second or 0.0,
        )
        yield GaugeMetricFamily(
            f"{p}_upload_rows_per_second",
            "Rows uploaded per second over the last minute",
            value=uploader.rows_per_second or 0.0,
        )
        if uploader.backlog_eta_seconds is not None:
            yield GaugeMetricFamily(
                f"{p}_upload_backlog_eta_seconds",
                "Seconds to drain the runs not yet uploaded at the current rate",
                value=uploader.backlog_eta_seconds,
            )
        if loaded is not None:
            with self._update_lock:
                self.lag.update(loaded.fields_as_json())
        buckets, lag_sum = self.lag.buckets_for_prometheus()
        yield HistogramMetricFamily(
            f"{p}_event_to_tiled_seconds",
            "Event time to readable in Tiled, per flushed batch (oldest row)",
            buckets=buckets,
            sum_value=lag_sum,
        )
        yield from self._receiver_process.collect()
        pid = uploader_pid(self.spool)
        if pid is not None:  # no uploader running: no uploader process metrics (absent, not 0)
            self._uploader_pid = pid
            yield from self._uploader_process.collect()


class MetricsServer:
    """Serves /metrics and /healthz on `address` ("host:port") in a thread (`http_server.BoundedHTTPServer`)."""

    def __init__(self, address: str, stats: ReceiverStats, spool: SpoolDir) -> None:
        bind = host_port(address)
        if bind is None:
            raise ConfigError(f"[metrics] address must be HOST:PORT, not {address!r}")
        registry = CollectorRegistry()
        registry.register(SidecarCollector(stats, spool))
        self.loop_beat = time.time()
        server = self

        class Handler(BaseHTTPRequestHandler):
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

        self.httpd = BoundedHTTPServer(bind, Handler, name="metrics", max_connections=MAX_CONNECTIONS)

    @property
    def port(self) -> int:
        return self.httpd.port

    def start(self) -> None:
        self.httpd.start()

    def stop(self) -> None:
        self.httpd.stop()
