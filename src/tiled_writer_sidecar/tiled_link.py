"""The uploader's link to Tiled: one client, its up/down state, and how long to wait.

- `client` is None while Tiled is down; `connect` builds a new one only once
  `reachable` (one GET on a kept HTTP client) says the server answers.
- Every state change (connected, down, unauthorized, up again) is one log
  line and lands in the shared `UploaderStatus`; retries are counted there.
- One `Backoff` for outages and one short one for a busy Tiled (an append
  answered with a 5xx while the server answers); both reset on `recovered`.
- `give_up_after` (replay): failing longer than that raises
  `TiledUnavailableError`; `stop` interrupts every wait.
- `InPlaceRetry` is `tiled_run`'s `RetryPolicy` for one run, made of
  `wait_before_retry` and `recovered`: at most `IN_PLACE_ATTEMPTS` waits while
  Tiled answers (then the failure is the run's, which backs off on its own);
  while Tiled does not answer it waits as everyone does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from .backoff import Backoff
from .config import Config
from .errors import TiledUnavailableError
from .outcomes import Outcome, Stopping, TiledDown, classify, is_auth_error, one_line
from .spool.index import UploaderStatus
from .tiled_client import connect

log = logging.getLogger(__name__)

BUSY_BACKOFF_INITIAL_S = 0.05  # retrying an append Tiled answered with a 5xx (see TiledLink.busy_backoff)
BUSY_BACKOFF_MAX_S = 1.0
IN_PLACE_ATTEMPTS = 5  # waits of one failing request while Tiled answers others (see InPlaceRetry)


class TiledLink:
    """Tiled's client and state for one uploader; see the module docstring."""

    def __init__(
        self,
        config: Config,
        status: UploaderStatus,
        *,
        stop: threading.Event,
        report: Callable[[], None],
        give_up_after: float | None = None,
    ) -> None:
        self.config = config
        self.status = status
        self.stop_event = stop
        self.report = report  # writes the status now (a state change, a failure)
        self.give_up_after = give_up_after
        self.client: Any = None
        self._probe: httpx.Client | None = None
        self._probe_error: str | None = None
        self._failing_since: float | None = None
        self.backoff = Backoff(config.tiled.backoff_initial_seconds, config.tiled.backoff_max_seconds)
        # Tiled answers but is busy (SQLite "database is locked" while a client reads): the same
        # append usually goes through a moment later, so retry it soon, not on the outage backoff.
        self.busy_backoff = Backoff(BUSY_BACKOFF_INITIAL_S, BUSY_BACKOFF_MAX_S)

    def connected(self) -> Any:
        """The Tiled client, built now if there is none (TiledDown if Tiled was down and still is)."""
        if self.client is None:
            if self.status.tiled == "down" and not self.reachable():
                raise TiledDown(self._probe_error or "Tiled is not reachable")
            self.client = connect(self.config)
            self.set_state("up")
        return self.client

    def reachable(self) -> bool:
        """Whether Tiled's server answers at all (one GET on a client kept for this).

        Cheap on purpose: it is asked on every failure, and before every
        reconnection while Tiled is down (a new HTTP client costs ~20 ms of
        CPU to load the TLS trust store).
        """
        server = urlsplit(self.config.tiled.uri)
        if self._probe is None:
            self._probe = httpx.Client(timeout=5)
        try:
            response = self._probe.get(f"{server.scheme}://{server.netloc}/api/v1/")
        except httpx.HTTPError as err:
            self._probe_error = one_line(err)
            return False
        self._probe_error = None if response.status_code < 500 else f"HTTP {response.status_code}"
        return response.status_code < 500

    def failed(self, err: Exception) -> None:
        """A step failed (any run it broke is abandoned already): note it, back off, then go on."""
        self.status.retries += 1
        outcome = classify(err)
        if outcome in (Outcome.REWRITE, Outcome.REJECTED, Outcome.QUARANTINE):
            self.status.last_error = one_line(err)
        elif is_auth_error(err):
            self.client = None
            self.set_state("unauthorized", one_line(err))
        elif not isinstance(err, TiledDown) and self.reachable():
            log.warning("upload failed, Tiled is reachable: %s", one_line(err))
            self.status.last_error = one_line(err)
        else:
            self.client = None
            self.set_state("down", str(err) if isinstance(err, TiledDown) else one_line(err))
        self.report()
        self._give_up_if_too_long(err)
        self.stop_event.wait(self.backoff.next_delay())

    def wait_before_retry(self, err: Exception) -> None:
        """A run's append failed transiently: note it, back off (Stopping if asked to stop)."""
        self.status.retries += 1
        self.status.append_retries += 1
        backoff = self.backoff
        if self.reachable():
            if self._failing_since is None:
                log.warning("append failed, Tiled is reachable; retrying it in place: %s", one_line(err))
            self.status.last_error = one_line(err)
            backoff = self.busy_backoff
        else:
            self.set_state("down", one_line(err))
        self.report()
        self._give_up_if_too_long(err)
        if self.stop_event.wait(backoff.next_delay()):
            raise Stopping

    def recovered(self) -> None:
        """A request succeeded after failures (or a step went through): reset the backoff."""
        if self._failing_since is not None:
            self._failing_since = None
            self.backoff.reset()
            self.busy_backoff.reset()
            if self.client is not None:
                self.set_state("up")

    def set_state(self, state: str, error: str | None = None) -> None:
        """Record Tiled's state (and the error that says why); one log line when it changes."""
        if error:
            self.status.last_error = error
        if state == self.status.tiled:
            return
        previous, since = self.status.tiled, self.status.since
        self.status.tiled, self.status.since = state, time.time()
        if state == "up":
            if previous in ("down", "unauthorized"):
                log.warning("tiled up again uri=%s after %.1f s", self.config.tiled.uri, time.time() - since)
            else:
                log.info("tiled connected uri=%s", self.config.tiled.uri)
        elif state == "unauthorized":
            log.error(
                "tiled unauthorized: check the API key (TILED_API_KEY or api_key_file); data stays spooled"
            )
        else:
            log.warning(
                "tiled down uri=%s: %s; retrying with backoff, data stays spooled",
                self.config.tiled.uri,
                error,
            )

    def close(self) -> None:
        """Close the probe and the Tiled client (a later step connects again)."""
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self.client is not None:
            self.client.context.close()
            self.client = None

    def _give_up_if_too_long(self, err: Exception) -> None:
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if self.give_up_after is not None and now - self._failing_since > self.give_up_after:
            raise TiledUnavailableError(
                f"giving up after {now - self._failing_since:.0f} s: {self.config.tiled.uri}: {one_line(err)}"
            )


class InPlaceRetry:
    """`tiled_run.RetryPolicy` for one run's failed append: the link's backoff and status, then the same
    append; beyond `IN_PLACE_ATTEMPTS` failures while Tiled answers, `err` is raised (the run backs off)."""

    def __init__(self, link: TiledLink) -> None:
        self.link = link
        self.failures = 0

    def wait(self, err: Exception) -> None:
        self.failures += 1
        if self.failures > IN_PLACE_ATTEMPTS and self.link.reachable():
            raise err
        self.link.wait_before_retry(err)

    def recovered(self) -> None:
        self.failures = 0
        self.link.recovered()
