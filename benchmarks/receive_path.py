"""2. Receive path: bursts published without pause; documents per second into the spool, and lost.

- ``daemon``: a start, a descriptor, N events and a stop are pickled first
  (exactly the `Publisher`'s framing, ``prefix name pickle``), then sent as
  fast as the Publisher's own PUB socket takes them, through bluesky's proxy,
  to the `tiled-writer-sidecar run` daemon (Tiled down, so its uploader only
  backs off and the receiver has the machine). The spool is watched from
  outside (segment sizes, never the daemon's HTTP endpoint, which would take
  the receiver's GIL); the rate is documents in the spool / time from the
  first send to the last byte appended. Lost = sent - records in the run's
  log (read back, CRC-checked); the daemon's own message counter tells
  whether a loss happened before the receiver (bluesky's Publisher and
  proxy keep 0MQ's default high-water mark of 1,000 messages, and drop
  beyond it) or in it. With ``fsync = "batch"`` each record is on
  disk at most ``fsync_interval_ms`` (200 ms) after it was appended.
- ``daemon_publisher_burst``: a run of N events handed one by one to
  bluesky's `Publisher` (it pickles each document as the RunEngine's
  callback would, which paces the sender at what one Python thread can
  pickle), through the same proxy and daemon.
- ``daemon_flow_controlled``: the same frames, but the sender never gets
  more than 300 documents ahead of what the spool holds (it reads the
  segment sizes): upstream 0MQ queues never overflow, so this is the fastest
  rate the sidecar sustains without loss.
- ``in_process``: the same frames handed to `Receiver.handle` in this process
  (decode, validate, route, append; `upkeep` every 10,000 like the daemon's
  loop), with ``fsync = "batch"`` and ``"never"``: the receiver's own ceiling
  and what fsync costs. One such run is profiled (cProfile).
"""

from __future__ import annotations

import cProfile
import time
from typing import Any

from .common import (
    Bench,
    RunTemplate,
    dead_tiled_uri,
    make_publisher,
    profile_summary,
    publisher_socket,
    segment_bytes,
    send_flow_controlled,
    sidecar_settings,
    spool_records,
    start_pipelines,
    summary,
    synthetic_run,
)

NAME = "receive_path"
TITLE = "Receive path (bursts into the spool)"
TARGET = ">= 50,000 documents/s into the spool with fsync=batch, 0 lost"
SETTLE_S = 1.0


def _burst(
    pipe: Any, publisher: Any, template: RunTemplate, n: int, scan_id: int, mode: str
) -> dict[str, Any]:
    """Send one run (``mode``: raw frames, flow-controlled frames, or through the Publisher); watch the spool."""
    socket = publisher_socket(publisher)
    uid, messages, sizes = template.fresh(n, scan_id)
    documents = list(synthetic_run(n, scan_id=scan_id)) if mode == "publisher" else []
    if documents:
        uid = str(documents[0][1]["uid"])
    run_dir = pipe.spool_dir / "runs" / uid
    messages_before = pipe.sidecar.health()["receiver"]["messages"]
    cpu0 = pipe.cpu_seconds()
    stalls = 0
    t0 = time.perf_counter()
    if mode == "flow":
        stalls = send_flow_controlled(socket, messages, sizes, run_dir)
    elif mode == "publisher":
        for name, doc in documents:
            publisher(name, doc)
    else:
        for message in messages:
            socket.send(message)
    published = time.perf_counter() - t0
    size, changed = -1, time.perf_counter()
    deadline = t0 + 600
    while time.perf_counter() < deadline:
        now_size = segment_bytes(run_dir)
        now = time.perf_counter()
        if now_size != size:
            size, changed = now_size, now
        elif now - changed >= SETTLE_S:
            break
        time.sleep(0.005)
    spooled_at = changed - t0
    cpu = pipe.cpu_seconds() - cpu0
    spooled = spool_records(pipe.spool_dir).get(uid, 0) if run_dir.exists() else 0
    received = pipe.sidecar.health()["receiver"]["messages"] - messages_before
    return {
        "documents": len(messages),
        "publish_seconds": published,
        "publish_rate": len(messages) / published,
        "spool_seconds": spooled_at,
        "rate": spooled / spooled_at if spooled_at > 0 else 0.0,
        "spooled": spooled,
        "lost": len(messages) - spooled,
        "lost_before_receiver": len(messages) - received,
        "messages_received": received,
        "daemon_cpu_seconds": cpu,
        "daemon_cpu_us_per_document": 1e6 * cpu / max(1, spooled),
        "flow_control_stalls": stalls,
    }


def _in_process(bench: Bench, messages: list[bytes], fsync: str, tag: str, profile: bool = False) -> Any:
    from tiled_writer_sidecar.config import Config, SpoolConfig, ZmqConfig
    from tiled_writer_sidecar.receive.counters import ReceiverStats
    from tiled_writer_sidecar.receive.receiver import Receiver
    from tiled_writer_sidecar.spool.directory import SpoolDir
    from tiled_writer_sidecar.testing import free_port

    root = bench.workdir / f"receive-inprocess-{tag}"
    # The socket is connected to a port nothing binds: messages are handed to `handle` directly.
    config = Config(
        zmq=ZmqConfig(address=f"tcp://127.0.0.1:{free_port()}"), spool=SpoolConfig(dir=str(root), fsync=fsync)
    )
    receiver = Receiver(config, SpoolDir(root), ReceiverStats())
    frames = [[m] for m in messages]
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    for i, frame in enumerate(frames, 1):
        receiver.handle(frame)
        if i % 10_000 == 0:
            receiver.upkeep()
    receiver.close()
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - t0
    stored = sum(receiver.stats.documents.values())
    if profiler:
        return profiler
    return {"seconds": seconds, "rate": stored / seconds, "spooled": stored, "lost": len(messages) - stored}


SPEC = {"settings": sidecar_settings(), "api_key": None}


def prepare(bench: Bench) -> None:
    start_pipelines(bench, {"down": {**SPEC, "tiled_uri": dead_tiled_uri()}}, wait=False)


def run(bench: Bench) -> dict[str, Any]:
    sizes = [bench.size(50_000, 2_000), bench.size(200_000, 5_000)]
    in_process_size = bench.size(50_000, 2_000)
    flow_size = bench.size(50_000, 5_000)
    pipes = start_pipelines(bench, {"down": {**SPEC, "tiled_uri": dead_tiled_uri()}})
    pipe = pipes["down"]
    publisher = make_publisher(pipe.proxy.in_address)
    pipe.wait_messages(publisher_socket(publisher))
    pipe.wait_uploader_settled()
    template = RunTemplate(max(*sizes, flow_size, in_process_size))
    reps = []
    scan_id = 1000
    try:
        for rep in range(bench.reps):
            row: dict[str, Any] = {}
            runs = [(f"daemon_burst_{size}", size, "raw") for size in sizes]
            runs += [(f"daemon_publisher_burst_{size}", size, "publisher") for size in sizes]
            runs.append((f"daemon_flow_controlled_{flow_size}", flow_size, "flow"))
            shift = rep % len(runs)
            for key, size, mode in runs[shift:] + runs[:shift]:
                scan_id += 1
                row[key] = _burst(pipe, publisher, template, size, scan_id, mode)
            _uid, messages, _sizes = template.fresh(in_process_size)
            for fsync in ("batch", "never") if rep % 2 == 0 else ("never", "batch"):
                row[f"in_process_{fsync}"] = _in_process(bench, messages, fsync, f"{rep}-{fsync}")
            row["daemon_vs_in_process_ratio"] = (
                row[f"daemon_burst_{sizes[0]}"]["rate"] / row["in_process_batch"]["rate"]
            )
            reps.append(row)
            bench.log(
                f"  rep {rep + 1}: "
                + ", ".join(
                    f"{k} {v['rate']:,.0f} docs/s lost {v['lost']}"
                    for k, v in row.items()
                    if isinstance(v, dict)
                )
                + "; publish "
                + ", ".join(
                    f"{v['publish_rate']:,.0f}"
                    for k, v in row.items()
                    if k.startswith("daemon_") and isinstance(v, dict)
                )
                + " docs/s"
            )
    finally:
        publisher.close()
    _uid, messages, _sizes = template.fresh(in_process_size)
    profile = profile_summary(
        _in_process(bench, messages, "batch", "profile", profile=True),
        inclusive={
            "decode (wire.decode_message)": "tiled_writer_sidecar/wire.py:decode_message",
            "validate (validation.validate_document)": "tiled_writer_sidecar/validation.py:validate_document",
            "stage in the log (spooler.stage)": "tiled_writer_sidecar/spooler.py:stage",
            "write the log (spooler.flush)": "tiled_writer_sidecar/spooler.py:flush",
        },
    )
    keys = [k for k, v in reps[0].items() if isinstance(v, dict)]
    out: dict[str, Any] = {
        "sizes": sizes,
        "in_process_size": in_process_size,
        "rate": {k: summary([r[k]["rate"] for r in reps]) for k in keys},
        "lost": {k: sum(r[k]["lost"] for r in reps) for k in keys},
        "documents": {k: sum(r[k]["spooled"] + r[k]["lost"] for r in reps) for k in keys},
        "publish_rate": {
            k: summary([r[k]["publish_rate"] for r in reps]) for k in keys if k.startswith("daemon")
        },
        "daemon_cpu_seconds": {
            k: summary([r[k]["daemon_cpu_seconds"] for r in reps]) for k in keys if k.startswith("daemon")
        },
        "ratios": {
            "daemon_vs_in_process": summary([r["daemon_vs_in_process_ratio"] for r in reps]),
            "fsync_batch_vs_never": summary(
                [r["in_process_batch"]["rate"] / r["in_process_never"]["rate"] for r in reps]
            ),
        },
        "profile_in_process": profile,
        "repetitions": reps,
    }
    daemon_keys = [k for k in keys if k.startswith("daemon")]
    worst = min(out["rate"][k]["median"] for k in daemon_keys)
    lost = {k: out["lost"][k] for k in daemon_keys}
    out["headline"] = {
        "daemon_rate_min_median": worst,
        "rate_median": {k: out["rate"][k]["median"] for k in keys},
        "lost": lost,
        "lost_fraction": {k: out["lost"][k] / out["documents"][k] for k in daemon_keys},
        "target_met": bool(worst >= 50_000 and not any(lost.values())),
    }
    return out
