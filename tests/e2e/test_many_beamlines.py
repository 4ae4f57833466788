"""Many beamlines, one Tiled: four sidecars at once into one PostgreSQL-backed deployment of two Tiled servers.

How a facility runs it: one sidecar per beamline host, all writing into one
Tiled deployment whose catalog and tables are in PostgreSQL, served by
several Tiled server processes on the same database
(`PostgresTiledDeployment`: one PostgreSQL, two ``tiled serve``). Each
beamline here has its own bluesky-0MQ-proxy, its own RunEngine in its own
process (``python -m benchmarks.scale_out acquire``: ``count([det], N)``
runs, its documents and event times written to a file) and its own sidecar
and spool; beamline i writes through Tiled server i mod 2, and its runs are
read back through the other server. PostgreSQL is restarted (fast shutdown,
then started again) while the RunEngines acquire and the sidecars upload.
Skipped (with the reason) where PostgreSQL is not installed.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.postgres import PostgresTiledDeployment, postgres_unavailable
from tiled_writer_sidecar.testing import Acquisition, ZmqProxy, wait_until
from tiled_writer_sidecar.testing._process import ManagedProcess
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

ROOT = Path(__file__).resolve().parents[2]
BEAMLINES = 4
RUNS = 6
EVENTS = 150

#: Quick batches and retries, so the test stays short.
SETTINGS: dict[str, dict[str, Any]] = {
    "tiled": {"batch_seconds": 0.2, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0}
}


class RunEngineProcess:
    """``python -m benchmarks.scale_out acquire``: a RunEngine of its own, started by a go file."""

    def __init__(self, directory: Path, proxy: ZmqProxy, go: Path, resume: Path) -> None:
        directory.mkdir(parents=True)
        self.progress = directory / "progress.jsonl"
        self.result = directory / "acquired.json"
        argv = [sys.executable, "-m", "benchmarks.scale_out", "acquire", "--rows"]
        argv += ["--in-address", str(proxy.in_address), "--out-address", str(proxy.out_address)]
        argv += ["--runs", str(RUNS), "--events", str(EVENTS), "--go", str(go)]
        argv += ["--pause-after", str(RUNS // 4), "--resume", str(resume)]
        argv += ["--progress", str(self.progress), "--result", str(self.result)]
        self.process = ManagedProcess(argv, log_path=directory / "runengine.log", cwd=ROOT)

    def _lines(self) -> list[str]:
        if not self.process.running and not self.result.exists():
            raise RuntimeError(
                f"RunEngine process exited ({self.process.returncode}):\n{self.process.log_tail()}"
            )
        try:
            return self.progress.read_text().splitlines()
        except FileNotFoundError:
            return []

    def ready(self) -> bool:
        return any('"ready"' in line for line in self._lines())

    def runs_done(self) -> int:
        return len(self.finished())

    def finished(self) -> list[dict[str, Any]]:
        """The runs acquired so far (uid, start and end time)."""
        return [entry for line in self._lines() if "uid" in (entry := json.loads(line))]

    def runs(self) -> list[dict[str, Any]]:
        """Once it has exited: per run its uid, start/end time, event times and expected rows."""
        import json

        wait_until(
            lambda: not self.process.running, 300, interval=0.1, what="the RunEngine process to finish"
        )
        assert self.process.returncode == 0, self.process.log_tail()
        runs: list[dict[str, Any]] = json.loads(self.result.read_text())["runs"]
        return runs


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[PostgresTiledDeployment]:
    """One PostgreSQL and two Tiled servers on it, NOT started: the test starts it beside the beamlines."""
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    deployment = PostgresTiledDeployment(tmp_path / "deployment", servers=2)
    try:
        yield deployment
    finally:
        deployment.close()


def rows_in_postgres(deployment: PostgresTiledDeployment) -> tuple[int, int]:
    """Rows in the ``tables`` database counted by PostgreSQL: (of datasets the catalog knows, of others).

    Others are rows Tiled left behind: it deletes a dataset's rows after it has
    committed the deletion of its nodes, outside that transaction, so a
    failure in between (PostgreSQL restarting) leaves them (docs/upstream.md).
    """
    postgres = deployment.postgres
    known = {
        int(dataset_id)
        for (dataset_id,) in postgres.query(
            "SELECT parameters::jsonb ->> 'dataset_id' FROM data_sources"
            " WHERE parameters::jsonb ? 'dataset_id'",
            database="catalog",
        )
    }
    tables = postgres.query(
        "SELECT quote_ident(table_name) FROM information_schema.tables"
        " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
        database="tables",
    )
    counts: dict[int, int] = {}
    for (name,) in tables:
        for dataset_id, count in postgres.query(
            f"SELECT _dataset_id, count(*) FROM {name} GROUP BY _dataset_id", database="tables"
        ):
            counts[int(dataset_id)] = counts.get(int(dataset_id), 0) + int(count)
    return (
        sum(n for d, n in counts.items() if d in known),
        sum(n for d, n in counts.items() if d not in known),
    )


def gaps_between(runs: list[list[dict[str, Any]]], start: float, end: float) -> list[float]:
    """Seconds between consecutive events of one run, for the events made within [start, end)."""
    return [
        b - a
        for beamline in runs
        for run in beamline
        for a, b in zip(run["times"], run["times"][1:], strict=False)
        if start <= b < end
    ]


@pytest.mark.timeout(1200)
def test_four_beamlines_into_two_tiled_servers_on_one_postgresql_through_a_postgresql_restart(
    deployment: PostgresTiledDeployment, tmp_path: Path
) -> None:
    """Four beamlines acquire at once; PostgreSQL is restarted once every sidecar has uploaded a run, so
    uploads in flight fail and are retried: every run is in Tiled row for row and in seq_num order (read
    through the other Tiled server), every run is `uploaded` with no gap, PostgreSQL holds exactly the
    rows emitted for the runs in the catalog (no duplicate), and the RunEngines' median time per event while PostgreSQL was down is
    no worse than before (they never wait on Tiled; the 1.5x margin absorbs a shared machine's noise)."""
    go, resume = tmp_path / "go", tmp_path / "resume"
    clock = Stopwatch()
    with contextlib.ExitStack() as stack:
        proxies = [
            stack.enter_context(ZmqProxy(log_path=tmp_path / f"proxy-{i}.log")) for i in range(BEAMLINES)
        ]
        sidecars = [
            SidecarProcess(
                tmp_path / f"sidecar-{i}",
                zmq_address=proxy.out_address,
                tiled_uri=deployment.server_for(i).uri,
                api_key=deployment.api_key,
                settings=SETTINGS,
            )
            for i, proxy in enumerate(proxies)
        ]
        engines = [
            RunEngineProcess(tmp_path / f"runengine-{i}", proxy, go, resume)
            for i, proxy in enumerate(proxies)
        ]
        # Everything starts side by side (each start is seconds of imports); the sidecars wait for Tiled.
        for process in [*(s.process for s in sidecars), *(e.process for e in engines)]:
            process.spawn()
            stack.callback(process.terminate)
        deployment.start()
        clock.lap("PostgreSQL and both Tiled servers up")
        for sidecar in sidecars:
            wait_until(sidecar._answers, 120, what=f"sidecar health at {sidecar.health_url}")
        for proxy, sidecar in zip(proxies, sidecars, strict=True):
            with Acquisition.for_proxy(proxy) as probe:  # the sidecar listens before anything is published
                probe.wait_subscribers(lambda sidecar=sidecar: sidecar.messages_seen() > 0)
        wait_until(
            lambda: all(e.ready() for e in engines), 120, interval=0.2, what="RunEngine processes ready"
        )
        go.touch()
        clock.lap("sidecars and RunEngine processes ready")

        # Mid-upload: once every sidecar has uploaded a run and every RunEngine acquired a quarter of its
        # runs (and waits there), PostgreSQL goes down until every RunEngine has acquired two more runs,
        # then comes back.
        wait_until(
            lambda: all(
                e.runs_done() >= RUNS // 4 and uploaded(s, e.finished()[:1])
                for e, s in zip(engines, sidecars, strict=True)
            ),
            300,
            interval=0.05,
            what="first runs acquired and uploaded",
        )
        retries_before = sum(uploader_retries(s) for s in sidecars)
        down_at = [e.runs_done() for e in engines]
        t_down = _now()
        deployment.postgres.stop()
        resume.touch()  # each RunEngine paused after a quarter of its runs: it acquires on meanwhile
        wait_until(
            lambda: all(e.runs_done() >= n + 2 for e, n in zip(engines, down_at, strict=True)),
            300,  # 4 RunEngines, 4 sidecars, 2 Tiled servers on 2 cores: a run can take a minute
            interval=0.05,
            what="two runs per RunEngine acquired while PostgreSQL is down",
        )
        t_up = _now()
        clock.lap("PostgreSQL down while two runs per beamline were acquired")
        deployment.postgres.start()
        acquired = [engine.runs() for engine in engines]
        clock.lap("acquired the rest")
        for sidecar, runs in zip(sidecars, acquired, strict=True):
            wait_until(lambda sidecar=sidecar, runs=runs: uploaded(sidecar, runs), 180, what="runs uploaded")
        clock.lap("uploaded")
        # The outage did hit the uploads: requests failed and were retried.
        assert sum(uploader_retries(s) for s in sidecars) > retries_before
        for sidecar, runs in zip(sidecars, acquired, strict=True):
            by_uid = {run["uid"]: run for run in sidecar.status()["runs"]}
            for run in runs:
                assert by_uid[run["uid"]]["state"] == "uploaded", by_uid[run["uid"]]
                assert by_uid[run["uid"]]["gaps"] == {}
                assert by_uid[run["uid"]]["documents"] == EVENTS + 3  # start, descriptor, events, stop

    for i, runs in enumerate(acquired):
        other = deployment.server_for(i + 1).client()
        for run in runs:
            assert frame_rows(read_stream(other, run["uid"])) == run["rows"], (i, run["uid"])
    referenced, left_behind = rows_in_postgres(deployment)
    print(
        f"rows in PostgreSQL: {referenced} of runs in the catalog, {left_behind} left behind by deleted runs"
    )
    assert referenced == BEAMLINES * RUNS * EVENTS
    clock.lap("read back")

    first = min(run["started"] for runs in acquired for run in runs)
    before = gaps_between(acquired, first, t_down)
    during = gaps_between(acquired, t_down, t_up)
    assert len(during) >= BEAMLINES * EVENTS  # at least a run per beamline acquired while PostgreSQL was down
    print(
        f"RunEngine time per event (median ms): before {1e3 * statistics.median(before):.2f}, "
        f"PostgreSQL down {1e3 * statistics.median(during):.2f} ({len(during)} events)"
    )
    assert statistics.median(during) <= 1.5 * statistics.median(before)  # margin: a shared 2-core machine


def _now() -> float:
    return time.time()


class Stopwatch:
    """Prints how long each phase took (shown with -s, and in the report of a failure)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def lap(self, what: str) -> None:
        now = time.monotonic()
        print(f"{what}: {now - self.last:.1f} s")
        self.last = now


def uploaded(sidecar: SidecarProcess, runs: list[dict[str, Any]]) -> bool:
    """`runs` is not empty and every run of it is uploaded, read from the spool's files (no `status` subprocess per poll)."""
    from tiled_writer_sidecar.spool.state_files import Uploaded

    sidecar._alive()
    return bool(runs) and all(
        Uploaded.load(sidecar.spool_dir / "runs" / run["uid"]).state == "uploaded" for run in runs
    )


def uploader_retries(sidecar: SidecarProcess) -> int:
    """Upload failures the sidecar's uploader retried so far (its ``uploader.json``)."""
    try:
        return int(json.loads((sidecar.spool_dir / "uploader.json").read_text()).get("retries", 0))
    except (OSError, ValueError):
        return 0
