"""7. Bursts through bluesky's Publisher: stock or deep, into `tiled-writer-sidecar proxy` or `bluesky-0MQ-proxy`.

Four columns, identical but for the publisher and the proxy: bluesky's
`Publisher` (pickle, called once per document as the RunEngine's callback
is), either stock (0MQ's default send queue of 1,000 messages) or made with
`tiled_writer_sidecar.publisher.deep_publisher` (the project's
recommendation: `DEFAULT_QUEUE_MESSAGES`), -> the proxy -> a
`tiled-writer-sidecar run` daemon (Tiled down, so its uploader only backs
off and the receiver has the machine). One proxy+daemon per proxy kind,
shared by its stock and deep columns. In each repetition, for each burst (a
run of 50,000 and of 200,000 events published back to back, and 50,000
with the daemon SIGSTOPped for 1 s after the first 2,000 documents, as a
descheduled or frozen subscriber would be), every column gets the same
kind of run one after the other (order reversed every other repetition).

Measured per burst: the publishing rate, documents lost (sent - records in
the run's spool log, read back and CRC-checked, once the spool stopped
growing), the proxy's peak RSS during the burst (VmRSS sampled every
20 ms from /proc), and for the project's proxy its own counters: what it
received (sent - received = dropped by the Publisher before any proxy, at
its send queue's high-water mark), dropped, and its buffer's peak.

Result keys are ``{column}_{burst}``: columns ``bluesky``, ``sidecar``
(stock Publisher) and ``bluesky_deep``, ``sidecar_deep`` (deep Publisher);
`COLUMNS` names them. `section`, `headline`, `analysis` and `closing`
render them for RESULTS.md.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .common import (
    Bench,
    Pipeline,
    dead_tiled_uri,
    fmt_summary,
    make_publisher,
    publisher_socket,
    rss_mib,
    segment_bytes,
    sidecar_settings,
    spool_records,
    summary,
    synthetic_run,
)

NAME = "burst"
TITLE = "Bursts through bluesky's Publisher (stock or deep; project proxy vs bluesky-0MQ-proxy)"
TARGET = (
    "0 documents lost end to end with deep_publisher + tiled-writer-sidecar proxy for bursts of 50,000 "
    "and 200,000 events; 0 lost in or after the project proxy with any Publisher"
)
KINDS = ("sidecar", "bluesky")
PROXY_LABEL = {"sidecar": "tiled-writer-sidecar proxy", "bluesky": "bluesky-0MQ-proxy"}
#: column -> (proxy kind, deep Publisher?, label)
COLUMNS: dict[str, tuple[str, bool, str]] = {
    "bluesky": ("bluesky", False, "stock Publisher + bluesky-0MQ-proxy"),
    "sidecar": ("sidecar", False, "stock Publisher + project proxy"),
    "sidecar_deep": ("sidecar", True, "deep Publisher + project proxy"),
    "bluesky_deep": ("bluesky", True, "deep Publisher + bluesky-0MQ-proxy"),
}
SETTLE_S = 2.0
PAUSE_S = 1.0
PAUSE_AFTER = 2_000


class RssSampler:
    """Peak VmRSS of `pid` while running (a thread reading /proc every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid) or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid) or 0.0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib(self.pid) or 0.0)


def _pipelines(bench: Bench, *, wait: bool = True) -> dict[str, Pipeline]:
    """One proxy of each kind with a daemon subscribed to it (started once per benchmark run)."""
    from tiled_writer_sidecar.testing import ZmqProxy, wait_until
    from tiled_writer_sidecar.testing.sidecar import SidecarProcess

    pipes: dict[str, Pipeline] = bench.shared.setdefault("burst_pipelines", {})
    for kind in KINDS:
        if kind in pipes:
            continue
        proxy = bench.enter(ZmqProxy(kind=kind, log_path=bench.workdir / f"burst-proxy-{kind}.log"))
        sidecar = SidecarProcess(
            bench.workdir / f"burst-sidecar-{kind}",
            zmq_address=proxy.out_address,
            tiled_uri=dead_tiled_uri(),
            api_key=None,
            settings=sidecar_settings(),
        )
        sidecar.process.spawn()
        bench._stack.callback(sidecar.terminate)
        pipes[kind] = Pipeline(f"burst-{kind}", proxy, sidecar)
    if wait:
        for pipe in pipes.values():
            wait_until(pipe.sidecar._answers, 180, what=f"{pipe.name}: sidecar health")
    return pipes


def prepare(bench: Bench) -> None:
    """Start the proxies and spawn the daemons now, so they import while other comparisons run."""
    _pipelines(bench, wait=False)


def _wait_spooled(pipe: Pipeline, uid: str, deadline_s: float = 600.0) -> int:
    """Records of run `uid` once the spool stopped growing (closed and quiet, or quiet for 3 s)."""
    run_dir = pipe.spool_dir / "runs" / uid
    size, changed = -1, time.monotonic()
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        now_size, now = segment_bytes(run_dir), time.monotonic()
        if now_size != size:
            size, changed = now_size, now
        else:
            quiet = now - changed
            received, _ = pipe.run_state(uid) if run_dir.exists() else (None, None)
            if (received is not None and received.closed and quiet >= 0.5) or quiet >= SETTLE_S + 1:
                break
        pipe.sidecar._alive()
        time.sleep(0.02)
    return spool_records(pipe.spool_dir).get(uid, 0) if run_dir.exists() else 0


def _publisher(address: str, deep: bool) -> Any:
    """bluesky's Publisher as users make it: stock, or with the project's `deep_publisher`."""
    if not deep:
        return make_publisher(address)
    from tiled_writer_sidecar.publisher import deep_publisher

    return deep_publisher(address)


def _burst(
    pipe: Pipeline, kind: str, events: int, scan_id: int, pause: bool, deep: bool = False
) -> dict[str, Any]:
    documents = list(synthetic_run(events, scan_id=scan_id))
    uid = str(documents[0][1]["uid"])
    publisher = _publisher(pipe.proxy.in_address, deep)
    try:
        pipe.wait_messages(publisher_socket(publisher))
        before = pipe.proxy.metrics() if kind == "sidecar" else {}
        paused_at: float | None = None
        with RssSampler(int(pipe.proxy.pid)) as rss:
            t0 = time.perf_counter()
            for i, (name, doc) in enumerate(documents):
                if pause and i == PAUSE_AFTER:
                    pipe.sidecar.process.pause()
                    paused_at = time.perf_counter()
                elif paused_at is not None and i % 200 == 0 and time.perf_counter() - paused_at >= PAUSE_S:
                    pipe.sidecar.process.resume()
                    paused_at = None
                publisher(name, doc)
            published = time.perf_counter() - t0
            if paused_at is not None:
                time.sleep(max(0.0, PAUSE_S - (time.perf_counter() - paused_at)))  # the pause is the fault
                pipe.sidecar.process.resume()
            spooled = _wait_spooled(pipe, uid)
    finally:
        publisher.close()
    row: dict[str, Any] = {
        "documents": len(documents),
        "publish_rate": len(documents) / published,
        "spooled": spooled,
        "lost": len(documents) - spooled,
        "proxy_peak_rss_mib": rss.peak,
    }
    if kind == "sidecar":
        after = pipe.proxy.metrics()
        received = int(after["messages_received_total"] - before["messages_received_total"])
        row["proxy_received"] = received
        row["lost_before_proxy"] = len(documents) - received
        row["proxy_dropped"] = int(after["messages_dropped_total"] - before["messages_dropped_total"])
        row["buffer_peak_mib"] = after["buffered_bytes_peak"] / 2**20
    return row


def run(bench: Bench) -> dict[str, Any]:
    sizes = [bench.size(50_000, 2_000), bench.size(200_000, 5_000)]
    pipes = _pipelines(bench)
    for pipe in pipes.values():
        pipe.wait_uploader_settled()
    bursts = [(f"{size}", size, False) for size in sizes] + [(f"paused_{sizes[0]}", sizes[0], True)]
    reps = []
    scan_id = 7000
    columns = list(COLUMNS)
    for rep in range(bench.reps):
        row: dict[str, Any] = {}
        order = columns if rep % 2 == 0 else columns[::-1]
        for label, size, pause in bursts:
            for column in order:
                kind, deep, _ = COLUMNS[column]
                scan_id += 1
                row[f"{column}_{label}"] = _burst(pipes[kind], kind, size, scan_id, pause, deep)
        reps.append(row)
        bench.log(
            f"  rep {rep + 1}: "
            + ", ".join(
                f"{k} lost {v['lost']} at {v['publish_rate']:,.0f} docs/s, RSS {v['proxy_peak_rss_mib']:.0f} MiB"
                for k, v in row.items()
            )
        )
    keys = [f"{column}_{label}" for label, _, _ in bursts for column in columns]
    ours = [k for k in keys if k.startswith("sidecar")]
    out: dict[str, Any] = {
        "sizes": sizes,
        "pause_s": PAUSE_S,
        "columns": {column: label for column, (_, _, label) in COLUMNS.items()},
        "queue_messages": _queue_messages(),
        "publish_rate": {k: summary([r[k]["publish_rate"] for r in reps]) for k in keys},
        "lost": {k: sum(r[k]["lost"] for r in reps) for k in keys},
        "documents": {k: sum(r[k]["documents"] for r in reps) for k in keys},
        "proxy_peak_rss_mib": {k: summary([r[k]["proxy_peak_rss_mib"] for r in reps]) for k in keys},
        "lost_before_proxy": {k: sum(r[k]["lost_before_proxy"] for r in reps) for k in ours},
        "proxy_dropped": {k: sum(r[k]["proxy_dropped"] for r in reps) for k in ours},
        "buffer_peak_mib": {k: summary([r[k]["buffer_peak_mib"] for r in reps]) for k in ours},
        "repetitions": reps,
    }
    deep_ours = [k for k in ours if k.startswith("sidecar_deep_")]
    out["headline"] = {
        "lost": out["lost"],
        "lost_in_or_after_proxy": {k: out["lost"][k] - out["lost_before_proxy"][k] for k in ours},
        "lost_end_to_end_deep": {k: out["lost"][k] for k in deep_ours},
        "target_met": not any(out["lost"][k] for k in deep_ours)
        and not any(out["lost"][k] - out["lost_before_proxy"][k] for k in ours),
    }
    return out


def _queue_messages() -> dict[str, int]:
    from tiled_writer_sidecar.publisher import DEFAULT_QUEUE_MESSAGES, ZMQ_DEFAULT_SNDHWM

    return {"stock": ZMQ_DEFAULT_SNDHWM, "deep": DEFAULT_QUEUE_MESSAGES}


# ------------------------------------------------------------------ RESULTS.md


def _split(c: dict[str, Any], key: str) -> tuple[str, str]:
    """A result key -> (column, burst label), longest column name first (``sidecar_deep`` before ``sidecar``)."""
    for column in sorted(c.get("columns", COLUMNS), key=len, reverse=True):
        if key.startswith(column + "_"):
            return column, key[len(column) + 1 :]
    kind, _, label = key.partition("_")
    return kind, label


def _ordered(c: dict[str, Any]) -> list[str]:
    """Result keys burst by burst (sizes, then the paused burst), columns in `COLUMNS` order within each."""
    columns = list(COLUMNS)

    def rank(key: str) -> tuple[int, int, int]:
        column, label = _split(c, key)
        size = int(label.removeprefix("paused_"))
        return (
            label.startswith("paused_"),
            size,
            columns.index(column) if column in columns else len(columns),
        )

    return sorted(c["lost"], key=rank)


def _column_label(c: dict[str, Any], column: str) -> str:
    labels = c.get("columns") or {name: label for name, (_, _, label) in COLUMNS.items()}
    return str(labels.get(column, column))


def _burst_label(c: dict[str, Any], label: str) -> str:
    size = int(label.removeprefix("paused_"))
    return f"{size:,} events" + (f", daemon paused {c['pause_s']:g} s" if label.startswith("paused_") else "")


def section(c: dict[str, Any]) -> list[str]:
    """One row per burst and column: rate, documents lost (before the project proxy), proxy RSS."""
    rows = []
    for key in _ordered(c):
        column, label = _split(c, key)
        before = c.get("lost_before_proxy", {}).get(key)
        rows.append(
            [
                _burst_label(c, label),
                _column_label(c, column),
                fmt_summary(c["publish_rate"][key]),
                f"{c['lost'][key]:,} of {c['documents'][key]:,}"
                + ("" if before is None else f" ({before:,} before the proxy)"),
                fmt_summary(c["proxy_peak_rss_mib"][key]),
            ]
        )
    header = [
        "burst",
        "publisher + proxy",
        "published docs/s",
        "documents lost (all repetitions)",
        "proxy peak RSS MiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    queue = c.get("queue_messages")
    note = (
        f"Send queue (SNDHWM): stock {queue['stock']:,} messages, deep {queue['deep']:,} "
        "(`tiled_writer_sidecar.publisher.deep_publisher`)."
        if queue
        else ""
    )
    return ["\n".join(lines), "", note] if note else ["\n".join(lines)]


def headline(c: dict[str, Any]) -> str:
    h = c.get("headline", {})
    by_column: dict[str, int] = {}
    for key in _ordered(c):
        column, lost = _split(c, key)[0], h.get("lost", {}).get(key, 0)
        by_column[column] = by_column.get(column, 0) + int(lost)
    return "lost: " + ", ".join(f"{_column_label(c, col)} {n:,}" for col, n in by_column.items())


def analysis(c: dict[str, Any], _all: dict[str, Any]) -> list[str]:
    def total(prefix: str, table: str = "lost") -> int:
        return sum(v for k, v in c.get(table, {}).items() if _split(c, k)[0] == prefix)

    ours = [k for k in c["lost"] if _split(c, k)[0] in ("sidecar", "sidecar_deep")]
    inside = sum(c["lost"][k] - c["lost_before_proxy"][k] for k in ours)
    peak = max((c["buffer_peak_mib"][k]["max"] or 0.0) for k in ours)
    stock_before, deep_lost = total("sidecar", "lost_before_proxy"), total("sidecar_deep")
    lines = [
        f"- tiled-writer-sidecar proxy: {inside} documents lost in or after the proxy, "
        f"{sum(c['proxy_dropped'][k] for k in ours)} dropped by its buffer limit; its buffer held at most "
        f"{peak:.1f} MiB.",
        (
            f"- Stock Publisher + project proxy: {stock_before:,} documents never reached the proxy (its own "
            "counter): the Publisher dropped them at 0MQ's 1,000-message send queue when the proxy was not "
            "scheduled in time on this shared 2-core machine."
            if stock_before
            else "- Stock Publisher + project proxy: every document reached the proxy in these runs (its own "
            "counter): its 1,000-message send queue never overflowed."
        ),
        f"- deep Publisher + project proxy: {deep_lost:,} lost end to end "
        f"({total('sidecar_deep', 'lost_before_proxy'):,} before the proxy): the deep send queue holds "
        "what the proxy has not read yet.",
        f"- bluesky-0MQ-proxy lost {total('bluesky'):,} with the stock Publisher and {total('bluesky_deep'):,} "
        "with the deep one: a deep Publisher removes the loss on its way in, but bluesky-0MQ-proxy still "
        "drops at its own 1,000-message queue towards a subscriber that is not scheduled in time.",
    ]
    if "bluesky_deep" not in {_split(c, k)[0] for k in c["lost"]}:
        lines.pop()
    return lines


def closing(c: dict[str, Any]) -> str:
    return (
        "- Bursts through bluesky's Publisher, documents lost (all bursts and repetitions): "
        + headline(c).removeprefix("lost: ")
        + "."
    )
