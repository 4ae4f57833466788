"""The event-to-Tiled lag histogram, as ``uploader.json`` carries it from the uploader to ``/metrics``.

The uploader observes each row's lag (`LagHistogram.observe`) and writes the cumulative buckets
into ``uploader.json`` (`as_status`, field ``lag_histogram``); the metrics server of the receiver
process keeps one and feeds it each ``uploader.json`` it reads (`update`).

The lag histogram (``event_to_tiled_seconds``) is cumulative, as Prometheus
needs for ``rate()`` and ``histogram_quantile``: `update` adds only what
is new in each ``uploader.json`` it reads, so no bucket ever goes down while
this process lives. It reads, in order of preference, ``lag_histogram``
(cumulative buckets kept by the uploader, `LagHistogram.as_status`; a
decrease means the uploader restarted) or today's ``lag_seconds`` list (the
last 1000 samples: the new ones are those after the longest overlap with
the list read before).
"""

from __future__ import annotations

import math
import threading
from typing import Any, TypeGuard

LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class LagHistogram:
    """Cumulative lag histogram: counts per `LAG_BUCKETS` bound (+Inf last), sum, count.

    The uploader can keep one (`observe` each sample, `as_status` into
    ``uploader.json`` as ``lag_histogram``); the metrics server keeps one per
    process and feeds it each ``uploader.json`` it reads (`update`).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets = [0] * (len(LAG_BUCKETS) + 1)  # cumulative: samples <= bound; last is +Inf
        self.sum = 0.0
        self.count = 0
        self._seen_status: tuple[list[int], float] | None = None  # last `lag_histogram` read
        self._seen_samples: list[float] = []  # last `lag_seconds` list read

    def observe(self, seconds: float) -> None:
        """Add one sample (ignored unless it is a finite number)."""
        if not _finite(seconds):
            return
        with self.lock:
            for i, bound in enumerate(LAG_BUCKETS):
                if seconds <= bound:
                    self.buckets[i] += 1
            self.buckets[-1] += 1
            self.sum += seconds
            self.count += 1

    def as_status(self) -> dict[str, Any]:
        """The histogram as ``uploader.json`` carries it (field ``lag_histogram``)."""
        with self.lock:
            return {"bounds": list(LAG_BUCKETS), "buckets": list(self.buckets), "sum": self.sum}

    def update(self, uploader: dict[str, Any]) -> None:
        """Add what is new in one read of ``uploader.json`` (see the module docstring)."""
        status = _histogram_status(uploader.get("lag_histogram"))
        if status is not None:
            self._add_status(*status)
            return
        samples = uploader.get("lag_seconds")
        if isinstance(samples, list):
            for sample in self._new_samples([x for x in samples if _finite(x)]):
                self.observe(sample)

    def _add_status(self, buckets: list[int], total: float) -> None:
        seen = self._seen_status
        self._seen_status = (buckets, total)
        if seen is not None and all(now >= before for now, before in zip(buckets, seen[0], strict=True)):
            delta = [now - before for now, before in zip(buckets, seen[0], strict=True)]
            delta_sum = total - seen[1]
        else:  # first read, or the uploader restarted: all of it is new
            delta, delta_sum = buckets, total
        with self.lock:
            self.buckets = [a + b for a, b in zip(self.buckets, delta, strict=True)]
            self.sum += max(0.0, delta_sum)
            self.count = self.buckets[-1]

    def _new_samples(self, samples: list[float]) -> list[float]:
        """The tail of `samples` not read before: after the longest overlap with the last read."""
        before, self._seen_samples = self._seen_samples, samples
        first = samples[0] if samples else None
        for start in range(len(before)):  # the earliest start gives the longest overlap
            if before[start] == first:
                overlap = before[start:]
                if samples[: len(overlap)] == overlap:
                    return samples[len(overlap) :]
        return samples  # no overlap: the uploader restarted (or more than 1000 came since)

    def buckets_for_prometheus(self) -> tuple[list[tuple[str, float]], float]:
        with self.lock:
            bounds = [str(b) for b in LAG_BUCKETS] + ["+Inf"]
            return list(zip(bounds, map(float, self.buckets), strict=True)), self.sum


def _finite(value: Any) -> TypeGuard[float]:
    """A real number that fits a float and is finite (not a bool, NaN, inf or 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _histogram_status(value: Any) -> tuple[list[int], float] | None:
    """``(buckets, sum)`` from a ``lag_histogram`` field, or None if absent or not ours."""
    if not isinstance(value, dict) or value.get("bounds") != list(LAG_BUCKETS):
        return None
    buckets, total = value.get("buckets"), value.get("sum")
    if (
        not isinstance(buckets, list)
        or len(buckets) != len(LAG_BUCKETS) + 1
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63 for n in buckets)
        or not _finite(total)
    ):
        return None
    return buckets, float(total)
