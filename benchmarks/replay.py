"""6. Spool replay: ``tiled-writer-sidecar replay`` of a 1M-event spool; rows/s and peak RSS.

The spool is the copy `memory` (comparison 5) took of its full backlog
(10 runs x 100,000 events received by the daemon through the proxy); if
that comparison did not run, the same backlog is spooled here by the
sidecar's `Receiver`. The real command runs as a subprocess against the
shared Tiled server (into a fresh container), exactly as an operator would
run it; its own "done in X s" line gives the upload time without start-up
(imports, connecting), and its VmRSS is sampled from /proc every 0.25 s
(peak = the largest sample, and VmHWM read at the last sample).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Any

from .backlog_drain import make_backlog
from .common import Bench, peak_rss_mib, rss_mib

NAME = "replay"
TITLE = "Spool replay (tiled-writer-sidecar replay)"
TARGET = "rows/s and peak RSS of replaying a 1M-event spool (no numeric target)"


def run(bench: Bench) -> dict[str, Any]:
    from tiled_writer_sidecar.testing.sidecar import sidecar_command

    tiled = bench.tiled()
    spool = bench.shared.get("replay_spool")
    if spool is None:
        n_runs, n_events = bench.size(10, 2), bench.size(100_000, 2_000)
        path = bench.workdir / "replay-spool"
        made = make_backlog(path, n_runs, n_events)
        spool = {
            "path": path,
            "runs": n_runs,
            "documents": made["documents"],
            "events": made["events"],
            "made_here": True,
        }
    tiled.client().create_container("replay")
    env = {**os.environ, "TILED_API_KEY": tiled.api_key, "COLUMNS": "200"}
    cmd = [
        *sidecar_command(),
        "replay",
        "--spool-dir",
        str(spool["path"]),
        "--tiled-uri",
        f"{tiled.uri}/api/v1/metadata/replay",
    ]
    log_path = bench.workdir / "replay.log"
    samples: list[tuple[float, float]] = []
    hwm = 0.0
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        while process.poll() is None:
            rss = rss_mib(process.pid)
            if rss is not None:
                samples.append((time.monotonic() - t0, rss))
                hwm = max(hwm, peak_rss_mib(process.pid) or 0.0)
            time.sleep(0.25)
    wall = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"replay exited with {process.returncode}:\n{text[-2000:]}")
    match = re.search(r"done in ([\d.]+) s: (\d+) run\(s\) uploaded, (\d+) documents, (\d+) rows", text)
    if match is None:
        raise RuntimeError(f"replay printed no summary:\n{text[-2000:]}")
    seconds, runs, documents, rows = float(match[1]), int(match[2]), int(match[3]), int(match[4])
    peak = max((rss for _, rss in samples), default=0.0)
    return {
        "spool": {k: str(v) if k == "path" else v for k, v in spool.items()},
        "seconds": seconds,
        "wall_seconds_with_startup": wall,
        "runs": runs,
        "documents": documents,
        "rows": rows,
        "rows_per_s": rows / seconds,
        "peak_rss_mib": max(peak, hwm),
        "rss_samples": samples,
        "headline": {"rows_per_s": rows / seconds, "peak_rss_mib": max(peak, hwm), "target_met": None},
    }
