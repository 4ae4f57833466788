"""The benchmarks still run: `python -m benchmarks.run --smoke` end to end, no timing asserted.

It starts real processes (Tiled, proxies, sidecar daemons, `replay`) with
tiny sizes and one repetition, into a temporary results path, so the
committed `benchmarks/results.json` is never touched. What is checked is the
shape of the results: every comparison ran, and each reports numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = (
    "runengine_cost",
    "receive_path",
    "backlog_drain",
    "live_latency",
    "memory",
    "replay",
    "burst",
    "live_streaming",
)
# scale_out (4 sidecars, PostgreSQL, 2 Tiled servers) is left out here: tests/e2e/test_many_beamlines.py
# runs the same deployment end to end.


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.timeout(900)
def test_smoke_run_writes_every_comparison_with_numbers(tmp_path: Path) -> None:
    """`--smoke` runs every comparison but scale-out and writes results.json, RESULTS.md and the plots."""
    results_path = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--smoke",
            "--results",
            str(results_path),
            *(arg for name in COMPARISONS for arg in ("--only", name)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(results_path.read_text())
    assert results["run"]["smoke"] is True
    assert results["machine"]["cpus"] >= 1
    comparisons = results["comparisons"]
    assert set(COMPARISONS) <= set(comparisons)
    for name in COMPARISONS:
        entry = comparisons[name]
        assert entry["status"] == "ok", (name, entry.get("traceback", ""))
        assert _number(entry["seconds"]) and entry["target"]
        assert entry["headline"], name

    re_cost = comparisons["runengine_cost"]
    for config in (
        "re_alone",
        "publisher",
        "sidecar_up",
        "sidecar_down",
        "tiledwriter_10000",
        "tiledwriter_1",
    ):
        assert _number(re_cost["ms_per_event"][config]["median"]), config
    assert _number(re_cost["headline"]["sidecar_up_vs_publisher"])
    assert _number(re_cost["headline"]["sidecar_down_vs_publisher"])

    receive = comparisons["receive_path"]
    assert all(_number(s["median"]) for s in receive["rate"].values())
    assert all(isinstance(n, int) for n in receive["lost"].values())

    drain = comparisons["backlog_drain"]
    assert all(_number(drain["rows_per_s"][c]["median"]) for c in ("inprocess", "sidecar"))
    assert _number(drain["headline"]["sidecar_vs_inprocess"])
    assert drain["parity"]["green"], drain["parity"]["problems"]

    latency = comparisons["live_latency"]
    assert all(_number(v) for v in latency["headline"]["p99_median"].values())

    memory = comparisons["memory"]
    assert _number(memory["headline"]["peak_process_mib"]) and memory["samples"]
    assert memory["lost"] == 0

    replay = comparisons["replay"]
    assert _number(replay["rows_per_s"]) and _number(replay["peak_rss_mib"])
    assert replay["rows"] == memory["events"]

    burst = comparisons["burst"]
    assert all(lost == 0 for lost in burst["headline"]["lost_in_or_after_proxy"].values())

    streaming = comparisons["live_streaming"]
    assert streaming["headline"]["every_row_once"], streaming["results"]
    for row in streaming["results"]:
        assert row["rows_delivered"] == row["events"] and not row["problems"], row
        assert _number(row["lag_p99_s"]) and _number(row["runengine_cost_per_event_ms"]), row
    assert all(_number(v) for v in streaming["headline"]["sidecar_p99_s"].values())

    report = (tmp_path / "RESULTS.md").read_text()
    for name in (
        "RunEngine cost",
        "Receive path",
        "Backlog drain",
        "Live latency",
        "Memory",
        "Spool replay",
        "Bursts through",
        "Live streaming",
    ):
        assert name in report
    for plot in ("runengine_cost", "receive_path", "backlog_drain", "live_latency", "memory"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0
