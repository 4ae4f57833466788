"""The benchmarks still run: `python -m benchmarks.run --smoke` end to end, no timing asserted.

It starts real processes (Tiled, proxies, sidecar daemons, `replay`) with
tiny sizes and one repetition, into a temporary results path, so the
committed `benchmarks/results.json` is never touched. What is checked is the
shape of the results: every comparison ran, and each reports numbers.

Also (fast, no server): the profile behind "many small runs"' per-run
breakdown puts each stack in the right phase, counts each request with the
phase that sent it, samples every thread, and counts state-file writes with
their fsyncs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from benchmarks._breakdown import IDLE, Classifier, Counters, Phase, RequestLog, StackSampler

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
    "small_runs",
)
# scale_out (4 sidecars, PostgreSQL, 2 Tiled servers) is left out here: tests/e2e/test_many_beamlines.py
# runs the same deployment end to end.


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.process
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

    small = comparisons["small_runs"]
    for shape in small["shapes"]:
        assert all(_number(shape["runs_per_s"][side]["median"]) for side in ("sidecar", "inprocess"))
        assert _number(shape["ratio"]["median"]), shape
        for side in ("sidecar", "inprocess"):
            per_run = shape["breakdown"][side]
            # a run is at least: its node, its stream, its table: requests counted, not assumed
            assert per_run["http"]["requests_per_run"] >= 3, (side, per_run["http"])
            assert sum(p["ms_per_run"] for p in per_run["phases"].values()) > 0, side
        assert shape["breakdown"]["sidecar"]["counts_per_run"]["fsync"] > 0
    assert _number(small["memory"]["peak_rss_mib"]) and small["memory"]["runs_uploaded"] >= 1

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
        "Many small runs",
    ):
        assert name in report
    for plot in ("runengine_cost", "receive_path", "backlog_drain", "live_latency", "memory"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0


# ----------------------------------------------------------------- the profile behind "where a run's time goes"

HERE = "tests/test_benchmarks_smoke.py"
PHASES = (
    Phase("outer", ((HERE, "_outer"),)),
    Phase("inner", ((HERE, "_inner"),)),
    Phase(IDLE, (("threading.py", "wait"),)),
)
SCOPE = ("/" + HERE,)


def _outer(inner: object) -> object:
    return inner() if callable(inner) else None


def _inner() -> object:
    return Classifier(PHASES, SCOPE).classify(sys._getframe())


def test_classifier_puts_a_stack_in_its_innermost_marked_phase() -> None:
    """A stack through two marked functions belongs to the innermost one; an unmarked stack to none."""
    phase, http, ours, _ = _outer(_inner)  # type: ignore[misc]
    assert (phase, http, ours) == ("inner", False, True)
    assert Classifier(PHASES, ("/nowhere/",)).classify(sys._getframe())[2] is False


def test_request_log_counts_each_request_with_the_phase_that_sent_it() -> None:
    """Requests are counted by wrapping httpx.Client.send; a wait inside a request is the request's."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(Classifier(PHASES, SCOPE).classify(sys._getframe()))
        return httpx.Response(200, json={})

    log = RequestLog(Classifier(PHASES, SCOPE))
    with log.installed(), httpx.Client(transport=httpx.MockTransport(handler)) as client:

        def _inner() -> None:  # the marker names this function
            client.get("http://tiled.invalid/api/v1/metadata/x")
            client.post("http://tiled.invalid/api/v1/table/full/x")

        _outer(_inner)
        client.get("http://tiled.invalid/healthz")
    assert [(phase, kind) for phase, kind, _ in log.requests] == [
        ("inner", "GET metadata"),
        ("inner", "POST table"),
        ("other", "GET other"),
    ]
    assert all(http for _, http, _, _ in seen)


def test_sampler_attributes_a_busy_threads_time_to_its_phase() -> None:
    """Every thread is sampled (a worker's CPU lands in its phase), a waiting one counts as idle."""
    stop = threading.Event()

    def _inner() -> None:  # busy, in phase "inner"
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            sum(range(1000))

    def _outer() -> None:  # waits, in phase "outer" but innermost in threading.wait: idle
        stop.wait(10)

    sampler = StackSampler(Classifier(PHASES, SCOPE))
    waiter = threading.Thread(target=_outer)
    with sampler:
        waiter.start()
        worker = threading.Thread(target=_inner)
        worker.start()
        worker.join()
        stop.set()
        waiter.join()
    assert sampler.seconds["inner"] > 0.1, sampler.seconds
    assert sampler.seconds[IDLE] > 0.1, sampler.seconds
    assert "outer" not in sampler.seconds


def test_counters_count_state_file_writes_and_their_fsyncs(tmp_path: Path) -> None:
    """The spool's atomic_write_json is counted, with the fsyncs it makes (file and directory)."""
    from tiled_writer_sidecar.spool import state_files

    counters = Counters(tiledwriter=False)
    with counters.installed():
        state_files.atomic_write_json(tmp_path / "state.json", {"state": "uploaded"})
    assert counters.counts["atomic state-file writes"] == 1
    assert counters.counts["fsync"] >= 1
    assert state_files.atomic_write_json.__name__ == "atomic_write_json"  # unwrapped again


def test_small_runs_keys_shapes_by_backend_and_runs_in_flight_and_judges_only_the_default() -> None:
    """A PostgreSQL shape or another runs_in_flight is kept beside the default one (``--add``), shown with
    its setting, and not counted for the target (measured on the default Tiled and setting)."""
    from benchmarks import small_runs

    def shape(ratio: float, **extra: object) -> dict[str, object]:
        return {"runs": 200, "events": 50, "ratio": {"median": ratio}, **extra}

    default = shape(2.5, tiled="sqlite", runs_in_flight=small_runs.RUNS_IN_FLIGHT)
    postgres = shape(1.2, tiled="postgresql", runs_in_flight=1)
    assert small_runs.key_of(default) == small_runs.key_of(shape(1.0)) == "200x50"
    assert small_runs.key_of(postgres) == "200x50@postgresql~1"
    assert small_runs._label(postgres) == "200 x 50 (PostgreSQL Tiled, 1 in flight)"
    figures = small_runs.headline_figures([default, postgres], None)  # type: ignore[list-item]
    assert figures["ratio_by_shape"] == {"200x50": 2.5, "200x50@postgresql~1": 1.2}
    assert figures["target_met"] is True
