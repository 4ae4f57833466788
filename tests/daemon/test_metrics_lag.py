"""The lag histogram on /metrics is cumulative: no bucket ever goes down (issue 14).

The real `MetricsServer` serves a real spool whose ``uploader.json`` is
rewritten between scrapes the way the uploader does it: today's
``lag_seconds`` list (the last 1000 samples, oldest dropped first), and the
cumulative ``lag_histogram`` field the uploader can add (`LagHistogram.as_status`).
Each scrape is an HTTP GET of /metrics, parsed as Prometheus text.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tiled_writer_sidecar.daemon.metrics import MetricsServer
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.lag import LAG_BUCKETS, LagHistogram
from tiled_writer_sidecar.spool.state_files import atomic_write_json
from tiled_writer_sidecar.testing import free_port

NAME = "tiled_writer_sidecar_event_to_tiled_seconds"


class Scraper:
    """A MetricsServer over a spool; `write(**uploader)` then `scrape()` -> {le: count, sum, count}."""

    def __init__(self, root: Path) -> None:
        self.spool = SpoolDir(root)
        self.server = MetricsServer(f"127.0.0.1:{free_port()}", ReceiverStats(), self.spool)

    def write(self, **uploader: object) -> None:
        atomic_write_json(self.spool.root / "uploader.json", {"tiled": "up", **uploader})

    def scrape(self) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{self.server.port}/metrics", timeout=10).text
        found = {m[1]: float(m[2]) for m in re.finditer(NAME + r'_bucket\{le="([^"]+)"\} (\S+)', text)}
        for part in ("sum", "count"):
            match = re.search(rf"^{NAME}_{part} (\S+)$", text, re.MULTILINE)
            assert match, text
            found[part] = float(match[1])
        return found


@pytest.fixture
def scraper(tmp_path: Path) -> Iterator[Scraper]:
    scraper = Scraper(tmp_path / "spool")
    scraper.server.start()
    try:
        yield scraper
    finally:
        scraper.server.stop()


def expected(samples: list[float]) -> dict[str, float]:
    counts = {str(b): float(sum(1 for s in samples if s <= b)) for b in LAG_BUCKETS}
    return {**counts, "+Inf": float(len(samples)), "count": float(len(samples))}


def assert_monotonic(scrapes: list[dict[str, float]]) -> None:
    for before, after in itertools.pairwise(scrapes):
        for key, value in before.items():
            assert after[key] >= value, (key, before, after)


def without_sum(scrape: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in scrape.items() if k != "sum"}


def test_sliding_lag_list_never_lowers_a_bucket(scraper: Scraper) -> None:
    """1000 fast flushes (0.05 s) then slow ones (100 s) push the fast ones out of uploader.json's
    list: the le=0.1 bucket stays at 1000 (the old histogram, rebuilt from the list, fell) and
    every sample ever listed is counted once."""
    rng = random.Random(7)
    listed: list[float] = []
    everything: list[float] = []
    scrapes = []
    for batch in [[0.05 + rng.random() / 1000 for _ in range(1000)]] + [
        [100 + rng.random() for _ in range(n)] for n in (10, 300, 1, 0, 500)
    ]:
        listed = (listed + batch)[-1000:]
        everything += batch
        scraper.write(lag_seconds=listed, last_lag_seconds=listed[-1])
        scrapes.append(scraper.scrape())
    assert_monotonic(scrapes)
    assert without_sum(scrapes[-1]) == expected(everything)
    assert scrapes[-1]["0.1"] == 1000
    assert scrapes[-1]["sum"] == pytest.approx(sum(everything))


def test_an_uploader_restart_that_empties_the_list_keeps_the_counts(scraper: Scraper) -> None:
    """The uploader restarts with an empty list, then lists new samples: counts only grow and
    include both lives."""
    first = [0.3, 0.7, 1.5]
    scraper.write(lag_seconds=first)
    a = scraper.scrape()
    scraper.write(lag_seconds=[])
    b = scraper.scrape()
    second = [0.3, 12.0]
    scraper.write(lag_seconds=second)
    c = scraper.scrape()
    assert_monotonic([a, b, c])
    assert without_sum(c) == expected(first + second)


def test_cumulative_buckets_from_the_uploader_are_preferred_and_restarts_handled(scraper: Scraper) -> None:
    """With ``lag_histogram`` in uploader.json the list is ignored; an uploader restart (its counts
    fall back to zero) adds its new counts on top instead of lowering the exported ones."""
    life = LagHistogram()
    for sample in (0.05, 0.2, 3.0):
        life.observe(sample)
    scraper.write(lag_histogram=life.as_status(), lag_seconds=[999.0])
    a = scraper.scrape()
    assert without_sum(a) == expected([0.05, 0.2, 3.0])
    life.observe(0.05)
    scraper.write(lag_histogram=life.as_status(), lag_seconds=[999.0])
    b = scraper.scrape()
    restarted = LagHistogram()
    restarted.observe(400.0)
    scraper.write(lag_histogram=restarted.as_status())
    c = scraper.scrape()
    assert_monotonic([a, b, c])
    assert without_sum(c) == expected([0.05, 0.2, 3.0, 0.05, 400.0])
    assert c["sum"] == pytest.approx(0.05 + 0.2 + 3.0 + 0.05 + 400.0)


def test_hostile_values_in_uploader_json_are_ignored() -> None:
    """NaN, inf, 10**400, strings, bools in the list, and a histogram with foreign bounds or
    negative counts: none is counted, nothing raises."""
    lag = LagHistogram()
    lag.update({"lag_seconds": [float("nan"), float("inf"), 10**400, "1", True, 0.5]})
    lag.update({"lag_histogram": {"bounds": [1, 2], "buckets": [1, 1, 1], "sum": 1.0}})
    lag.update({"lag_histogram": {"bounds": list(LAG_BUCKETS), "buckets": [-1] * 11, "sum": 1.0}})
    buckets, total = lag.buckets_for_prometheus()
    assert dict(buckets)["+Inf"] == 1 and dict(buckets)["0.5"] == 1 and total == 0.5
