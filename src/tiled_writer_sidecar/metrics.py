"""The daemon's HTTP endpoint: Prometheus ``/metrics`` and ``/healthz``.

Served from a thread of the receiver process. Nothing is computed on the
receive path: a custom collector reads the receiver's plain counters
(`stats.ReceiverStats`), the uploader's ``uploader.json`` and the spool's
per-run files when scraped. ``/healthz`` answers 200 while the sidecar can
receive and spool and 503 with the reason when it cannot (receiver loop
stalled, spool not writable or full). Tiled being down is reported in the
body but is not unhealthy: the sidecar is built for that.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .spool.directory import SpoolDir
from .spool.index import read_json
from .stats import ReceiverStats

LOOP_STALL_SECONDS = 10.0
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def health_snapshot(stats: ReceiverStats, spool: SpoolDir, loop_beat: float) -> dict[str, Any]:
    """The sidecar's state as one JSON-able dict (the body of /healthz)."""
    now = time.time()
    runs = spool.runs()
    pending = [r for r in runs if r.uploaded.state not in ("uploaded", "quarantined")]
    backlog_documents = sum(max(0, r.received.documents - r.uploaded.documents) for r in pending)
    backlog_bytes = sum(r.received.bytes for r in pending)
    oldest = min((r.received.first_received for r in pending), default=None)
    uploader = read_json(spool.root / "uploader.json") or {}
    reasons = []
    if now - loop_beat > LOOP_STALL_SECONDS:
        reasons.append(f"receiver loop stalled for {now - loop_beat:.0f} s")
    if not stats.spool_writable:
        reasons.append("spool is not writable or full; documents are being dropped")
    if stats.subscription_problem:
        reasons.append(stats.subscription_problem)
    return {
        "status": "unhealthy" if reasons else "ok",
        "reasons": reasons,
        "receiver": {
            "connected": stats.connected,
            "messages": stats.messages,
            "documents": sum(stats.documents.values()),
            "rejected": dict(stats.rejected),
            "gaps": stats.gaps,
            "dropped": stats.dropped,
            "last_message_age_seconds": now - stats.last_message if stats.last_message else None,
        },
        "spool": {
            "directory": str(spool.root),
            "bytes": stats.spool_bytes,
            "runs": len(runs),
            "backlog_runs": len(pending),
            "backlog_documents": backlog_documents,
            "backlog_bytes": backlog_bytes,
            "oldest_unuploaded_age_seconds": now - oldest if oldest else None,
            "writable": stats.spool_writable,
        },
        "tiled": {
            "state": uploader.get("tiled", "unknown"),
            "since": uploader.get("since"),
            "last_error": uploader.get("last_error"),
        },
        "upload": {
            "documents": uploader.get("documents", 0),
            "rows": uploader.get("rows", 0),
            "runs_uploaded": uploader.get("runs_uploaded", 0),
            "runs_quarantined": uploader.get("runs_quarantined", 0),
            "retries": uploader.get("retries", 0),
            "last_lag_seconds": uploader.get("last_lag_seconds"),
            "status_age_seconds": now - uploader["updated"] if "updated" in uploader else None,
        },
        "runs": [r.as_dict() for r in runs[-20:]],
    }


class SidecarCollector(Collector):
    def __init__(self, stats: ReceiverStats, spool: SpoolDir) -> None:
        self.stats = stats
        self.spool = spool

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
        health = health_snapshot(s, self.spool, time.time())
        spool = health["spool"]
        yield GaugeMetricFamily(
            f"{p}_backlog_documents", "Documents not yet in Tiled", value=spool["backlog_documents"]
        )
        yield GaugeMetricFamily(
            f"{p}_backlog_runs", "Runs not yet fully in Tiled", value=spool["backlog_runs"]
        )
        yield GaugeMetricFamily(
            f"{p}_oldest_unuploaded_age_seconds",
            "Age of the oldest run not yet fully in Tiled",
            value=spool["oldest_unuploaded_age_seconds"] or 0.0,
        )
        uploader = read_json(self.spool.root / "uploader.json") or {}
        yield GaugeMetricFamily(
            f"{p}_tiled_up", "1 if the uploader reaches Tiled", value=int(uploader.get("tiled") == "up")
        )
        yield CounterMetricFamily(
            f"{p}_uploaded_documents", "Documents uploaded", value=uploader.get("documents", 0)
        )
        yield CounterMetricFamily(f"{p}_uploaded_rows", "Event rows uploaded", value=uploader.get("rows", 0))
        yield CounterMetricFamily(
            f"{p}_runs_uploaded", "Runs uploaded", value=uploader.get("runs_uploaded", 0)
        )
        yield CounterMetricFamily(
            f"{p}_runs_quarantined", "Runs quarantined", value=uploader.get("runs_quarantined", 0)
        )
        yield CounterMetricFamily(
            f"{p}_upload_retries", "Upload failures retried", value=uploader.get("retries", 0)
        )
        yield CounterMetricFamily(
            f"{p}_upload_flushes", "Batches flushed to Tiled", value=uploader.get("flushes", 0)
        )
        lags = [float(x) for x in uploader.get("lag_seconds", [])]
        buckets = [(str(b), sum(1 for x in lags if x <= b)) for b in LAG_BUCKETS] + [("+Inf", len(lags))]
        yield HistogramMetricFamily(
            f"{p}_event_to_tiled_seconds",
            "Event time to readable in Tiled, per flushed batch (oldest row; last 1000 batches)",
            buckets=buckets,
            sum_value=sum(lags),
        )


class MetricsServer:
    """Serves /metrics and /healthz on `address` ("host:port") in a thread."""

    def __init__(self, address: str, stats: ReceiverStats, spool: SpoolDir) -> None:
        host, _, port = address.rpartition(":")
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
                    body = json.dumps(snapshot).encode()
                    ctype, code = "application/json", 200 if snapshot["status"] == "ok" else 503
                else:
                    body, ctype, code = b"not found: try /metrics or /healthz\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
