"""5. Memory: the daemon's RSS while a large backlog builds up (Tiled down) and while it drains.

The sidecar daemon is pointed at a TCP forwarder in this process that
refuses connections ("Tiled down"). Several runs, 1,000,000 events in all,
are published through bluesky's proxy, flow-controlled (never more than
300 documents ahead of the spool, see `common.send_flow_controlled`, so
nothing is lost to the Publisher's and proxy's high-water marks); then the forwarder starts forwarding to
the Tiled server ("Tiled up") and the backlog drains. All along, every
0.5 s, VmRSS of the receiver (the daemon) and of its uploader child is read
from /proc, with the backlog (documents spooled, rows uploaded).

"Flat" is measured as the slope of RSS against the backlog while it builds
(MiB per 100,000 documents; a leak per document would show) and the RSS at
the end of the build-up against the RSS after the first run. A copy of the
full spool is left for `replay` (comparison 6). This comparison runs once
(its 1M-document backlog is the repetition: hundreds of samples).

The uploader's RSS is mostly its imports (pandas, pyarrow, dask.array,
sqlalchemy through tiled); `process_defaults` keeps out what it never uses
(``sparse``/numba, ``blosc2``) and caps glibc's malloc arenas at 2. Measured
with this benchmark: idle 216 -> 195 MiB, peak while draining 257 -> 241 MiB.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .common import (
    Bench,
    RunTemplate,
    make_publisher,
    peak_rss_mib,
    publisher_socket,
    rss_mib,
    send_flow_controlled,
    sidecar_settings,
    spool_records,
    start_pipelines,
    stop_pipeline,
)

NAME = "memory"
TITLE = "Memory (sidecar RSS with a 1M-event backlog)"
TARGET = "<= 250 MiB and flat (does not grow with the backlog)"


class Forwarder:
    """A TCP port that refuses connections until `open()`, then forwards them to `target`."""

    def __init__(self, target_port: int) -> None:
        from tiled_writer_sidecar.testing import free_port

        self.port = free_port()
        self.target_port = target_port
        self._listener: socket.socket | None = None
        self._closed = threading.Event()
        self._connections: list[socket.socket] = []

    def open(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._connections += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 20):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        for s in self._connections:
            s.close()


class Sampler(threading.Thread):
    """Every `interval` s: RSS of the daemon and its uploader child, and the backlog."""

    def __init__(self, pipe: Any, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.phase = "build"
        self.stop = threading.Event()
        self.peak_uploader = 0.0

    def run(self) -> None:
        spool = self.pipe.spool_dir
        t0 = time.monotonic()
        while not self.stop.is_set():
            daemon = self.pipe.daemon_pid()
            children = self.pipe.uploader_pids()
            uploader = rss_mib(children[0]) if children else None
            if children:
                self.peak_uploader = max(self.peak_uploader, peak_rss_mib(children[0]) or 0.0)
            status = {}
            try:
                status = json.loads((spool / "uploader.json").read_text())
            except (OSError, ValueError):
                pass
            self.samples.append(
                {
                    "t": time.monotonic() - t0,
                    "phase": self.phase,
                    "receiver_mib": rss_mib(daemon),
                    "uploader_mib": uploader,
                    "spool_bytes": _segment_bytes(spool / "runs"),
                    "rows_uploaded": status.get("rows", 0),
                    "runs_uploaded": status.get("runs_uploaded", 0),
                }
            )
            self.stop.wait(self.interval)


def _segment_bytes(runs: Path) -> int:
    total = 0
    try:
        for run in runs.iterdir():
            for seg in run.glob("*.seg"):
                try:
                    total += seg.stat().st_size
                except FileNotFoundError:
                    pass
    except FileNotFoundError:
        pass
    return total


def _wait_settled(run_dir: Path, settle: float = 0.5, timeout: float = 600) -> None:
    size, changed = -1, time.monotonic()
    deadline = changed + timeout
    while time.monotonic() < deadline:
        now = (
            _segment_bytes(run_dir.parent)
            if not run_dir.exists()
            else sum(p.stat().st_size for p in run_dir.glob("*.seg"))
        )
        if now != size:
            size, changed = now, time.monotonic()
        elif time.monotonic() - changed >= settle:
            return
        time.sleep(0.02)


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def _spec(bench: Bench) -> dict[str, dict[str, Any] | None]:
    tiled = bench.tiled(wait=False)
    if "forwarder" not in bench.shared:
        forwarder = Forwarder(tiled.port)
        bench._stack.callback(forwarder.close)
        bench.shared["forwarder"] = forwarder
    uri = f"http://127.0.0.1:{bench.shared['forwarder'].port}/api/v1/metadata/memory"
    return {
        "memory": {
            "tiled_uri": uri,
            "api_key": tiled.api_key,
            "settings": sidecar_settings(backoff_max_seconds=2.0),
        }
    }


def prepare(bench: Bench) -> None:
    start_pipelines(bench, _spec(bench), wait=False)


def run(bench: Bench) -> dict[str, Any]:
    n_runs = bench.size(10, 2)
    n_events = bench.size(100_000, 2_000)
    spec = _spec(bench)
    forwarder = bench.shared["forwarder"]
    tiled = bench.tiled()
    tiled.client().create_container("memory")
    pipes = start_pipelines(bench, spec)
    pipe = pipes["memory"]
    publisher = make_publisher(pipe.proxy.in_address)
    sock = publisher_socket(publisher)
    pipe.wait_messages(sock)
    pipe.wait_uploader_settled()
    sampler = Sampler(pipe)
    sampler.start()
    sent = 0
    uids = []
    build_marks = []
    try:
        t_build = time.monotonic()
        stalls = 0
        template = RunTemplate(n_events)
        for i in range(n_runs):
            uid, messages, sizes = template.fresh(n_events, scan_id=i + 1)
            uids.append(uid)
            stalls += send_flow_controlled(sock, messages, sizes, pipe.spool_dir / "runs" / uid)
            sent += len(messages)
            del messages, sizes
            _wait_settled(pipe.spool_dir / "runs" / uid)
            build_marks.append({"run": i + 1, "sent": sent, "t": time.monotonic() - t_build})
            bench.log(f"  spooled run {i + 1}/{n_runs}: {sent:,} documents sent")
        build_seconds = time.monotonic() - t_build
        spooled = sum(spool_records(pipe.spool_dir).get(uid, 0) for uid in uids)
        copy = bench.workdir / "memory-spool-copy"
        shutil.copytree(pipe.spool_dir, copy, ignore=shutil.ignore_patterns("*.lock", "uploader.json"))
        bench.shared["replay_spool"] = {
            "path": copy,
            "runs": n_runs,
            "documents": spooled,
            "events": n_runs * n_events,
        }
        sampler.phase = "drain"
        t_up = time.monotonic()
        forwarder.open()
        bench.log("  Tiled up: draining")
        pipe.wait_uploaded(uids, timeout=1800)
        drain_seconds = time.monotonic() - t_up
        sampler.phase = "idle"
        time.sleep(2 * sampler.interval)
    finally:
        sampler.stop.set()
        sampler.join()
        publisher.close()
    stop_pipeline(bench, "memory")
    samples = sampler.samples
    build = [s for s in samples if s["phase"] == "build" and s["receiver_mib"]]
    drain = [s for s in samples if s["phase"] == "drain" and s["receiver_mib"]]
    first_drain_rows = next((s["t"] for s in drain if s["rows_uploaded"]), None)
    drain_t0 = drain[0]["t"] if drain else 0.0

    def stats(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
        values = [r[key] for r in rows if r[key] is not None]
        return {
            "max": max(values, default=None),
            "min": min(values, default=None),
            "last": values[-1] if values else None,
        }

    bytes_per_doc = (build[-1]["spool_bytes"] / spooled) if build and spooled else 1.0
    slope = {
        who: 1e5
        * _slope(
            [s["spool_bytes"] / bytes_per_doc for s in build if s[f"{who}_mib"] is not None],
            [s[f"{who}_mib"] for s in build if s[f"{who}_mib"] is not None],
        )
        for who in ("receiver", "uploader")
    }
    after_first = next(
        (s for s in build if s["spool_bytes"] / bytes_per_doc >= sent / n_runs), build[0] if build else None
    )
    out: dict[str, Any] = {
        "runs": n_runs,
        "events": n_runs * n_events,
        "documents_sent": sent,
        "documents_spooled": spooled,
        "lost": sent - spooled,
        "flow_control_stalls": stalls,
        "build_seconds": build_seconds,
        "build_rate": spooled / build_seconds,
        "drain_seconds": drain_seconds,
        "drain_rows_per_s": n_runs * n_events / drain_seconds,
        "drain_first_row_after_s": (first_drain_rows - drain_t0) if first_drain_rows is not None else None,
        "receiver_mib": {"build": stats(build, "receiver_mib"), "drain": stats(drain, "receiver_mib")},
        "uploader_mib": {"build": stats(build, "uploader_mib"), "drain": stats(drain, "uploader_mib")},
        "uploader_peak_hwm_mib": sampler.peak_uploader,
        "slope_mib_per_100k_documents": slope,
        "receiver_growth_mib": (build[-1]["receiver_mib"] - after_first["receiver_mib"])
        if build and after_first
        else None,
        "samples": samples,
        "build_marks": build_marks,
    }
    peak = max(
        (
            v
            for v in (
                out["receiver_mib"]["build"]["max"],
                out["receiver_mib"]["drain"]["max"],
                out["uploader_mib"]["build"]["max"],
                out["uploader_mib"]["drain"]["max"],
            )
            if v is not None
        ),
        default=0.0,
    )
    flat = abs(slope["receiver"]) < 1.0 and abs(slope["uploader"]) < 1.0
    out["headline"] = {
        "peak_process_mib": peak,
        "peak_total_mib": max(
            ((s["receiver_mib"] or 0) + (s["uploader_mib"] or 0) for s in samples), default=0.0
        ),
        "flat": flat,
        "target_met": bool(peak <= 250 and flat),
    }
    return out
