"""The one retry delay of the sidecar: exponential backoff with equal jitter.

The n-th delay after a failure is drawn uniformly from ``[c/2, c]`` where
``c = min(maximum, initial * 2**n)``: "equal jitter" in the terms of the AWS
architecture note on backoff (full jitter would draw from ``[0, c]`` and may
retry at once). Half the ceiling is kept as a floor so that a failing peer
is never hammered, the other half spreads retries of many clients apart.
`reset` after a success starts again from `initial`.

Used by the uploader (Tiled down; busy Tiled retried in place) and by the
daemon's supervisor (restarting a dead uploader process).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    """Exponential backoff with equal jitter (see the module docstring)."""

    initial: float
    maximum: float
    attempt: int = 0

    def ceiling(self) -> float:
        """The largest delay the next call can return."""
        return float(min(self.maximum, self.initial * 2 ** min(self.attempt, 64)))

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; each call doubles the ceiling."""
        ceiling = self.ceiling()
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
