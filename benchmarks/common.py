"""What every comparison needs: synthetic documents, statistics, /proc readings, the bench context.

- `synthetic_run` yields valid event-model documents (start, descriptor,
  N events, stop) made with `event_model.compose_run`; events are built by
  hand with the exact keys `compose_event` produces (composing them with
  validation costs ~350 us each, too slow for a million).
- `summary` gives median, quartiles, min and max of repeated measurements;
  ratios are always taken per repetition between configurations measured
  side by side in the same round, then summarised.
- `/proc` gives RSS (VmRSS, VmHWM) and CPU seconds of any process, so the
  daemon, its uploader child and the Tiled server are measured without
  psutil and without asking them.
- `Bench` holds what the comparisons share in one run: the work directory,
  one Tiled server (started once: a cold start costs 10-20 s), the smoke
  flag, the repetition count, and a place for findings one comparison
  leaves for another.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from event_model import compose_run

Document = tuple[str, dict[str, Any]]

DATA_KEYS = ("det", "motor", "motor_setpoint")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ documents


def synthetic_run(
    n_events: int,
    *,
    scan_id: int = 1,
    live: bool = False,
    md: dict[str, Any] | None = None,
) -> Iterator[Document]:
    """start, one `primary` descriptor, `n_events` scalar events, stop.

    With `live`, each event's ``time`` (and timestamps) is taken when the
    generator yields it, so a caller pacing the generator gets true event
    times; otherwise times advance by 1 ms from now.
    """
    bundle = compose_run(
        metadata={"plan_name": "count", "scan_id": scan_id, "detectors": ["det"], **(md or {})}
    )
    yield "start", bundle.start_doc
    data_keys = {
        key: {"dtype": "number", "shape": [], "source": f"SIM:{key}", "precision": 3, "object_name": key}
        for key in DATA_KEYS
    }
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys=data_keys,
        object_keys={"det": ["det"], "motor": ["motor", "motor_setpoint"]},
        hints={"det": {"fields": ["det"]}},
    )
    yield "descriptor", desc.descriptor_doc
    descriptor_uid = desc.descriptor_doc["uid"]
    t0 = time.time()
    for seq in range(1, n_events + 1):
        t = time.time() if live else t0 + seq * 1e-3
        x = float(seq % 1000) / 100.0
        yield (
            "event",
            {
                "uid": str(uuid.uuid4()),
                "time": t,
                "data": {"det": 1.0 + x * x, "motor": x, "motor_setpoint": x},
                "timestamps": {"det": t, "motor": t, "motor_setpoint": t},
                "seq_num": seq,
                "filled": {},
                "descriptor": descriptor_uid,
            },
        )
    stop = bundle.compose_stop(exit_status="success", validate=False)
    stop["num_events"] = {"primary": n_events}
    yield "stop", stop


def run_uid(documents: list[Document]) -> str:
    return str(documents[0][1]["uid"])


# ------------------------------------------------------------------ statistics


def summary(values: list[float]) -> dict[str, Any]:
    """Median, quartiles, min, max and relative spread ((max-min)/median) of `values`."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None, "values": []}
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    median = statistics.median(vals)
    return {
        "n": len(vals),
        "median": median,
        "q1": q1,
        "q3": q3,
        "min": vals[0],
        "max": vals[-1],
        "spread_pct": (100.0 * (vals[-1] - vals[0]) / median) if median else None,
        "values": [float(v) for v in values],
    }


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of a non-empty list."""
    vals = sorted(values)
    rank = max(1, min(len(vals), int(-(-pct * len(vals) // 100))))
    return float(vals[rank - 1])


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_summary(s: dict[str, Any], digits: int = 3, unit: str = "") -> str:
    """`median (min-max)` for a table cell."""
    if not s or s.get("median") is None:
        return "n/a"
    return f"{fmt(s['median'], digits)}{unit} ({fmt(s['min'], digits)}-{fmt(s['max'], digits)})"


# ------------------------------------------------------------------ /proc


def _status_field(pid: int, name: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return None


def rss_mib(pid: int) -> float | None:
    kib = _status_field(pid, "VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib(pid: int) -> float | None:
    kib = _status_field(pid, "VmHWM")
    return None if kib is None else kib / 1024


def cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    """User+system CPU seconds of `pid` (plus its reaped children with `children`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out = [pid]
    for child in child_pids(pid):
        out += process_tree(child)
    return out


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in process_tree(pid))


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine() -> dict[str, Any]:
    """What this machine is, for RESULTS.md."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("bluesky", "event-model", "tiled", "bluesky-tiled-plugins", "pyzmq", "pyarrow", "pandas"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    disk = shutil.disk_usage("/tmp")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "tmp_disk_free_gib": round(disk.free / 2**30, 1),
        "packages": versions,
        "loadavg_at_start": loadavg(),
    }


# ------------------------------------------------------------------ context


@dataclass
class Bench:
    """What the comparisons of one `benchmarks.run` share."""

    workdir: Path
    smoke: bool
    reps: int
    log: Any = print
    _tiled: Any = None
    shared: dict[str, Any] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def tiled(self, *, wait: bool = True) -> Any:
        """The Tiled server shared by every comparison (started on first use).

        With ``wait=False`` it is only spawned (its URI and API key are known),
        so daemons can start while it imports; a later call waits for it.
        """
        from tiled_writer_sidecar.testing import TiledServer

        if self._tiled is None:
            server = TiledServer(self.workdir / "tiled")
            self._stack.callback(server.close)
            server.start(wait=False)
            self._tiled = server
            self.shared["tiled_spawned"] = time.monotonic()
        if wait and not self.shared.get("tiled_ready"):
            self._tiled.wait_ready()
            self.shared["tiled_ready"] = True
            elapsed = time.monotonic() - self.shared["tiled_spawned"]
            self.log(f"  tiled server up {elapsed:.1f} s after spawn at {self._tiled.uri}")
        return self._tiled

    def enter(self, cm: Any) -> Any:
        return self._stack.enter_context(cm)

    def close(self) -> None:
        self._stack.close()

    def size(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full


def spawn_streaming_tiled(bench: Bench, name: str) -> None:
    """Spawn a Tiled server with a streaming cache as ``bench.shared[name]`` (closed with the bench); it
    imports while other comparisons run."""
    from tiled_writer_sidecar.testing import TiledServer

    server = TiledServer(bench.workdir / name, streaming_cache="memory")
    bench._stack.callback(server.close)
    server.start(wait=False)
    bench.shared[name] = server


def dead_tiled_uri() -> str:
    """A Tiled URI where nothing listens: "Tiled down"."""
    from tiled_writer_sidecar.testing import free_port

    return f"http://127.0.0.1:{free_port()}"


def sidecar_settings(**tiled: Any) -> dict[str, dict[str, Any]]:
    """The product's defaults (the test fixture shortens batch_seconds and backoff)."""
    return {"tiled": {"batch_seconds": 1.0, "backoff_max_seconds": 30.0, **tiled}}


def spool_records(spool_dir: Path) -> dict[str, int]:
    """Records in each run's log, counted by reading the segments (CRC-checked)."""
    from tiled_writer_sidecar.spool.segment import LogReader

    counts = {}
    runs = spool_dir / "runs"
    if not runs.is_dir():
        return counts
    for run_dir in runs.iterdir():
        if run_dir.is_dir():
            counts[run_dir.name] = sum(1 for _ in LogReader(run_dir).read())
    return counts


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


# ------------------------------------------------------------------ pipelines


@dataclass
class Pipeline:
    """A bluesky-0MQ-proxy, optionally with a `tiled-writer-sidecar run` daemon subscribed to it."""

    name: str
    proxy: Any
    sidecar: Any = None

    @property
    def spool_dir(self) -> Path:
        return Path(self.sidecar.spool_dir)

    def daemon_pid(self) -> int:
        return int(self.sidecar.process.pid)

    def uploader_pids(self) -> list[int]:
        return child_pids(self.daemon_pid())

    def cpu_seconds(self) -> float:
        """CPU seconds of the daemon and its uploader child so far."""
        return tree_cpu_seconds(self.daemon_pid())

    def run_state(self, uid: str) -> tuple[Any, Any]:
        """(received.json, uploaded.json) of a run, read from the spool (no subprocess)."""
        from tiled_writer_sidecar.spool.state_files import Received, Uploaded

        run_dir = self.spool_dir / "runs" / uid
        return Received.load(run_dir), Uploaded.load(run_dir)

    def wait_uploaded(self, uids: list[str], timeout: float = 300.0) -> None:
        from tiled_writer_sidecar.testing import wait_until

        def done() -> bool:
            for uid in uids:
                received, uploaded = self.run_state(uid)
                if received is None or uploaded.state not in ("uploaded", "quarantined"):
                    self.sidecar._alive()
                    return False
            return True

        wait_until(done, timeout, interval=0.1, what=f"{self.name}: runs uploaded")

    def wait_closed(self, uid: str, timeout: float = 120.0) -> Any:
        """Wait until the receiver closed the run (its stop arrived); return received.json."""
        from tiled_writer_sidecar.testing import wait_until

        def closed() -> Any:
            received, _ = self.run_state(uid)
            if received is None or not received.closed:
                self.sidecar._alive()
                return None
            return received

        return wait_until(closed, timeout, interval=0.05, what=f"{self.name}: run {uid} closed")

    def wait_uploader_settled(self, timeout: float = 180.0) -> str:
        """Wait until the uploader child has imported and tried Tiled once (its state is up or down).

        Until then it is importing tiled, pandas, pyarrow, ... (seconds of CPU)
        and would be measured as the sidecar's cost.
        """
        from tiled_writer_sidecar.testing import wait_until

        def settled() -> str | None:
            self.sidecar._alive()
            try:
                state = str(self.sidecar.health()["tiled"]["state"])
            except Exception:  # noqa: BLE001 - not answering yet
                return None
            return state if state in ("up", "down", "unauthorized") else None

        return str(wait_until(settled, timeout, interval=0.2, what=f"{self.name}: uploader settled"))

    def wait_messages(self, publisher_socket: Any, timeout: float = 60.0) -> None:
        """Send probe frames through the proxy until the sidecar has counted one (slow joiners)."""
        from tiled_writer_sidecar.testing import probe_message, wait_until

        before = self.sidecar.messages_seen()
        message = probe_message(uuid.uuid4().hex.encode())

        def seen() -> bool:
            publisher_socket.send(message)
            return self.sidecar.messages_seen() > before

        wait_until(seen, timeout, interval=0.1, what=f"{self.name}: sidecar receiving")


def start_pipelines(
    bench: Bench, specs: dict[str, dict[str, Any] | None], *, wait: bool = True
) -> dict[str, Pipeline]:
    """Start (or reuse) one proxy per name and, unless its spec is None, a sidecar daemon on it.

    A spec is ``{"tiled_uri": ..., "api_key": ..., "settings": {...}}``; a
    name already started is reused as it is. Daemons are spawned as soon as
    their proxy forwards; with `wait` this returns once every daemon answers
    /healthz (comparisons spawn theirs early, in `prepare`, and wait later).
    """
    from tiled_writer_sidecar.testing import ZmqProxy, wait_until
    from tiled_writer_sidecar.testing.sidecar import SidecarProcess

    pipelines: dict[str, Pipeline] = bench.shared.setdefault("pipelines", {})
    for name, spec in specs.items():
        if name in pipelines:
            continue
        proxy = bench.enter(ZmqProxy(log_path=bench.workdir / f"proxy-{name}.log"))
        pipelines[name] = Pipeline(name, proxy)
        if spec is None:
            continue
        sidecar = SidecarProcess(
            bench.workdir / f"sidecar-{name}",
            zmq_address=proxy.out_address,
            tiled_uri=spec["tiled_uri"],
            api_key=spec.get("api_key"),
            settings=spec.get("settings"),
        )
        sidecar.process.spawn()
        bench._stack.callback(sidecar.terminate)
        pipelines[name].sidecar = sidecar
    if wait:
        for name in specs:
            if pipelines[name].sidecar is not None:
                wait_until(pipelines[name].sidecar._answers, 180, what=f"sidecar {name} health")
    return {name: pipelines[name] for name in specs}


def stop_pipeline(bench: Bench, name: str) -> None:
    pipeline = bench.shared.get("pipelines", {}).pop(name, None)
    if pipeline is not None:
        if pipeline.sidecar is not None:
            pipeline.sidecar.terminate()
        pipeline.proxy.close()


def make_publisher(address: str) -> Any:
    """bluesky's standard Publisher (pickle) connected to a proxy's in-address."""
    from bluesky.callbacks.zmq import Publisher

    return Publisher(address)


def publisher_socket(publisher: Any) -> Any:
    """The Publisher's own PUB socket (to send pre-serialized frames in its exact framing)."""
    return publisher._socket


# ------------------------------------------------------------------ profiles


def _area(filename: str) -> str:
    """The package a profiled function belongs to (site-packages top level, or stdlib/builtin)."""
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins"
    marker = "site-packages/"
    if marker in filename:
        return filename.split(marker, 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/src/tiled_writer_sidecar/" in filename:
        return "tiled_writer_sidecar"
    if "/benchmarks/" in filename:
        return "benchmarks"
    return "stdlib"


def profile_summary(
    profile: Any, *, top: int = 15, inclusive: dict[str, str] | None = None
) -> dict[str, Any]:
    """What dominated a cProfile run: self time by package, top functions, chosen inclusive times.

    `profile` is a `cProfile.Profile` or the path of dumped stats.
    `inclusive` maps a label to ``"file-suffix:function"``; its cumulative time
    is reported (e.g. ``{"jsonschema validation": "jsonschema/validators.py:validate"}``).
    """
    import pstats

    stats = pstats.Stats(profile) if not isinstance(profile, str | Path) else pstats.Stats(str(profile))
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())
    areas: dict[str, float] = {}
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in raw.items():
        areas[_area(filename)] = areas.get(_area(filename), 0.0) + tt
        short = filename.split("site-packages/")[-1].split("/src/")[-1]
        rows.append({"function": f"{short}:{line}({func})", "calls": nc, "self_s": tt, "cumulative_s": ct})
    rows.sort(key=lambda r: -r["self_s"])
    found = {}
    for label, spec in (inclusive or {}).items():
        suffix, _, func = spec.rpartition(":")
        found[label] = max(
            (ct for (f, _l, fn), (_cc, _nc, _tt, ct, _c) in raw.items() if f.endswith(suffix) and fn == func),
            default=0.0,
        )
    return {
        "total_s": total,
        "self_by_package": dict(sorted(((k, v) for k, v in areas.items()), key=lambda kv: -kv[1])),
        "top_self": rows[:top],
        "inclusive_s": found,
    }


# ------------------------------------------------------------------ publishing


def encode_run(n_events: int, scan_id: int = 1) -> tuple[str, list[bytes], list[int]]:
    """One synthetic run as Publisher frames (``prefix name pickle``) and each record's size in the spool."""
    import pickle

    from tiled_writer_sidecar.spool.codec import pack_document
    from tiled_writer_sidecar.spool.record import HEADER_SIZE

    messages, sizes = [], []
    uid = ""
    for name, doc in synthetic_run(n_events, scan_id=scan_id):
        uid = uid or str(doc["uid"])
        messages.append(b" ".join([b"", name.encode(), pickle.dumps(doc)]))
        sizes.append(HEADER_SIZE + len(pack_document(name, doc)))
    return uid, messages, sizes


def segment_bytes(run_dir: Path) -> int:
    """Bytes in a run's segment files (what the receiver appended), 0 if none yet."""
    total = 0
    try:
        with os.scandir(run_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".seg"):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
    except FileNotFoundError:
        return 0
    return total


def send_flow_controlled(
    socket: Any,
    messages: list[bytes],
    sizes: list[int],
    run_dir: Path,
    *,
    window: int = 300,
    chunk: int = 100,
    stall_s: float = 5.0,
) -> int:
    """Send `messages`, never more than `window` ahead of what the spool holds; return stalls.

    The spool's segment bytes, compared with the cumulative record sizes, tell
    exactly how many documents the receiver has appended; keeping at most
    `window` + `chunk` in flight, well under 0MQ's default high-water mark
    (1,000, which 0MQ only approximates: it may drop sooner), means the
    Publisher and the proxy never drop, so this measures the fastest rate
    the sidecar sustains without loss. A wait longer than `stall_s` (a message lost
    anyway) gives up waiting for that chunk and is counted.
    """
    cumulative = []
    total = 0
    for size in sizes:
        total += size
        cumulative.append(total)
    stalls = 0
    for start in range(0, len(messages), chunk):
        for message in messages[start : start + chunk]:
            socket.send(message)
        behind = min(len(messages), start + chunk) - window
        if behind <= 0:
            continue
        need = cumulative[behind - 1]
        deadline = time.monotonic() + stall_s
        while segment_bytes(run_dir) < need:
            if time.monotonic() > deadline:
                stalls += 1
                break
            time.sleep(0.0005)
    return stalls


class RunTemplate:
    """Encoded events made once, reused for many runs (only the descriptor uid is swapped).

    Encoding a million documents costs seconds; a fresh run of `n` events is
    the template's first `n` event frames with the new descriptor's uid put
    in place of the old one (same length, so record sizes do not change), with
    a new start, descriptor and stop.
    """

    def __init__(self, n_max: int) -> None:
        _uid, messages, sizes = encode_run(n_max)
        self.n_max = n_max
        self.events = messages[2:-1]
        self.event_sizes = sizes[2:-1]
        import pickle

        self.descriptor_uid = pickle.loads(messages[1].split(b" ", 2)[2])["uid"].encode()

    def fresh(self, n: int, scan_id: int = 1) -> tuple[str, list[bytes], list[int]]:
        import pickle

        from tiled_writer_sidecar.spool.codec import pack_document
        from tiled_writer_sidecar.spool.record import HEADER_SIZE

        if n > self.n_max:
            raise ValueError(f"template holds {self.n_max} events, not {n}")
        (_, start), (_, descriptor), (_, stop) = list(synthetic_run(0, scan_id=scan_id))
        stop["num_events"] = {"primary": n}
        new = descriptor["uid"].encode()
        old = self.descriptor_uid
        head = [("start", start), ("descriptor", descriptor)]
        messages = [b" ".join([b"", name.encode(), pickle.dumps(doc)]) for name, doc in head]
        messages += [m.replace(old, new) for m in self.events[:n]]
        messages.append(b" ".join([b"", b"stop", pickle.dumps(stop)]))
        sizes = [HEADER_SIZE + len(pack_document(name, doc)) for name, doc in head]
        sizes += self.event_sizes[:n]
        sizes.append(HEADER_SIZE + len(pack_document("stop", stop)))
        return str(start["uid"]), messages, sizes


def rounded(value: Any) -> Any:
    """Floats to 5 significant digits (the measurements are not more precise), recursively."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value
