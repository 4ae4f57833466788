"""The uploader's link to Tiled: one client, its up/down state, and how long to wait.

- `client` is None while Tiled is down; `connect` builds a new one only once
  `reachable` (two GETs on a kept HTTP client: the root, and a lookup in
  its catalog) says the server answers and its database does too.
- Every state change is one log line and lands in the shared `UploaderStatus`;
  retries are counted there. The states (`states.TiledState`): ``connecting``,
  ``up``, ``down`` (no answer, or 5xx), ``unauthorized`` (the API key is
  refused or missing) and ``not_tiled`` (the URI answers, but not as Tiled).
  When a connection fails, `misconfigured` asks the server which of the last
  two it is (``GET /api/v1/``: Tiled's JSON, then ``/api/v1/metadata/``
  with the key), so a wrong setting is named at once, not retried silently.
- One `Backoff` for outages and one short one for a busy Tiled (an append
  answered with a 5xx while the server answers); both reset on `recovered`.
- `give_up_after` (replay): failing longer than that raises
  `TiledUnavailableError`; `stop` interrupts every wait.
- `failed` acts on a failure the scheduler decided (`policy.decide`): its
  outcome says whether to probe Tiled and which state to record.
- `InPlaceRetry` is `run_writer`'s `RetryPolicy` for one run, made of
  `wait_before_retry` and `recovered`: only `policy.retryable` failures (those
  of the rows RETRY and TILED_DOWN that httpx raises) are retried in place, at most `IN_PLACE_ATTEMPTS` waits while Tiled answers
  (then the failure is the run's, which backs off on its own); while Tiled
  does not answer it waits as everyone does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, assert_never
from urllib.parse import urlsplit

import httpx

from tiled_writer_sidecar import USER_AGENT
from tiled_writer_sidecar.backoff import Backoff
from tiled_writer_sidecar.config import Config
from tiled_writer_sidecar.errors import TiledUnavailableError
from tiled_writer_sidecar.spool.state_files import UploaderStatus
from tiled_writer_sidecar.states import TiledState
from tiled_writer_sidecar.upload.policy import (
    Outcome,
    Rule,
    Stopping,
    TiledDown,
    one_line,
    retryable,
)
from tiled_writer_sidecar.upload.tiled_calls import connect

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
BUSY_BACKOFF_INITIAL_S = 0.05  # retrying an append Tiled answered with a 5xx (see TiledLink.busy_backoff)
BUSY_BACKOFF_MAX_S = 1.0
#: A catalog lookup no run answers (404): a 5xx here means Tiled's database is down (see `reachable`).
PROBE_LOOKUP = "/api/v1/metadata/tiled-writer-sidecar-probe"
IN_PLACE_ATTEMPTS = 5  # waits of one failing request while Tiled answers others (see InPlaceRetry)


class Misconfigured(TiledDown):
    """Connecting failed because of a setting: Tiled refuses the API key, or the URI is not Tiled."""

    def __init__(self, state: TiledState, reason: str) -> None:
        super().__init__(reason)
        self.state = state


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
            if self.status.tiled == TiledState.DOWN and not self.reachable():
                raise TiledDown(self._probe_error or "Tiled is not reachable")
            try:
                self.client = connect(self.config)
            except Exception as err:
                misconfigured = self.misconfigured(err)
                if misconfigured is not None:
                    raise misconfigured from err
                raise
            self.set_state(TiledState.UP)
        return self.client

    def reachable(self) -> bool:
        """Whether Tiled serves requests: its root answers, and so does a lookup in its catalog.

        Two GETs on a client kept for this: ``/api/v1/``, then ``PROBE_LOOKUP``
        (a key no run has: 404 is an answer). A 5xx on the lookup is Tiled up
        with its database down, which fails every run's request alike: an
        outage, not one run's failure. Cheap on purpose: it is asked on every
        failure, and before every reconnection while Tiled is down (a new HTTP
        client costs ~20 ms of CPU to load the TLS trust store).
        """
        try:
            response = self._get("/api/v1/")
            if response.status_code < 500:
                response = self._get(PROBE_LOOKUP, headers=self._auth())
        except httpx.HTTPError as err:
            self._probe_error = one_line(err)
            return False
        failing = response.status_code >= 500
        self._probe_error = (
            f"HTTP {response.status_code} on GET {response.request.url.path}" if failing else None
        )
        return not failing

    def _auth(self) -> dict[str, str] | None:
        key = self.config.api_key()
        return {"Authorization": f"Apikey {key}"} if key else None

    def _get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        server = urlsplit(self.config.tiled.uri)
        if self._probe is None:
            self._probe = httpx.Client(timeout=PROBE_TIMEOUT_S, headers={"user-agent": USER_AGENT})
        return self._probe.get(f"{server.scheme}://{server.netloc}{path}", headers=headers)

    def misconfigured(self, err: Exception) -> Misconfigured | None:
        """Why connecting failed, if a setting is the cause: the URI is not Tiled, or the key is refused.

        Two GETs at most, only after a connection failed: ``/api/v1/`` must
        answer with Tiled's JSON (``api_version``); ``/api/v1/metadata/`` with
        the configured key must not answer 401/403. None when the server does
        not answer (Tiled is down) or both look right.
        """
        if isinstance(err, httpx.TransportError | ConnectionError | TimeoutError):
            return None
        uri = self.config.tiled.uri
        try:
            about = self._get("/api/v1/")
            if about.status_code >= 500:
                return None
            if not _is_tiled(about):
                kind = about.headers.get("content-type", "no content type").split(";")[0]
                return Misconfigured(
                    TiledState.NOT_TILED,
                    f"{uri} answers but is not a Tiled server (GET /api/v1/: HTTP {about.status_code}, {kind})",
                )
            key = self.config.api_key()
            metadata = self._get("/api/v1/metadata/", headers=self._auth())
        except httpx.HTTPError:
            return None
        if metadata.status_code in (401, 403):
            why = "refused the API key" if key else "requires an API key and none is set"
            return Misconfigured(
                TiledState.UNAUTHORIZED, f"Tiled at {uri} {why} (HTTP {metadata.status_code})"
            )
        return None

    def failed(self, err: Exception, rule: Rule) -> None:
        """A step failed, decided as `rule` (any run it broke is abandoned already): note it, back off.

        UNAUTHORIZED: the client is dropped, the state says so. TILED_DOWN, RETRY: Tiled is probed
        (unless `err` is the probe's own `TiledDown`); not answering, the client is dropped and the
        state is ``down`` (or what `Misconfigured` found). Any other outcome: the error is shown.
        """
        self.status.note_retry()
        match rule.outcome:
            case Outcome.UNAUTHORIZED:
                self.client = None
                self.set_state(TiledState.UNAUTHORIZED, one_line(err))
            case Outcome.TILED_DOWN | Outcome.RETRY if not isinstance(err, TiledDown) and self.reachable():
                log.warning("upload failed, Tiled is reachable: %s", one_line(err))
                self.status.note_error(one_line(err))
            case Outcome.TILED_DOWN | Outcome.RETRY:
                self.client = None
                state = err.state if isinstance(err, Misconfigured) else TiledState.DOWN
                self.set_state(state, str(err) if isinstance(err, TiledDown) else one_line(err))
            case Outcome.REWRITE | Outcome.REJECTED | Outcome.QUARANTINE | Outcome.STOP:  # (STOP: never here)
                self.status.note_error(one_line(err))
            case unknown:
                assert_never(unknown)
        self.report()
        self._give_up_if_too_long(err)
        self.stop_event.wait(self.backoff.next_delay())

    def wait_before_retry(self, err: Exception) -> None:
        """A run's append failed transiently: note it, back off (Stopping if asked to stop)."""
        self.status.note_retry(append=True)
        backoff = self.backoff
        if self.reachable():
            if self._failing_since is None:
                log.warning("append failed, Tiled is reachable; retrying it in place: %s", one_line(err))
            self.status.note_error(one_line(err))
            backoff = self.busy_backoff
        else:
            self.set_state(TiledState.DOWN, one_line(err))
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
                self.set_state(TiledState.UP)

    def set_state(self, state: TiledState, error: str | None = None) -> None:
        """Record Tiled's state (and the error that says why); one log line when it changes."""
        changed = self.status.note_tiled(state, error)
        if changed is None:
            return
        previous, since = changed
        uri = self.config.tiled.uri
        if state is TiledState.UP:
            if previous in (TiledState.DOWN, TiledState.UNAUTHORIZED, TiledState.NOT_TILED):
                log.warning("tiled up again uri=%s after %.1f s", uri, time.time() - since)
            else:
                log.info("tiled connected uri=%s", uri)
        elif state is TiledState.UNAUTHORIZED:
            log.error(
                "tiled unauthorized uri=%s: %s; check the API key (TILED_API_KEY or api_key_file); "
                "data stays spooled",
                uri,
                error or "HTTP 401/403",
            )
        elif state is TiledState.NOT_TILED:
            log.error(
                "tiled uri=%s is not a Tiled server: %s; fix [tiled] uri; data stays spooled", uri, error
            )
        else:
            log.warning("tiled down uri=%s: %s; retrying with backoff, data stays spooled", uri, error)

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


def _is_tiled(response: httpx.Response) -> bool:
    """Whether a ``GET /api/v1/`` answer is Tiled's: a JSON object with ``api_version``."""
    try:
        about = response.json()
    except ValueError:
        return False
    return isinstance(about, dict) and "api_version" in about


class InPlaceRetry:
    """`run_writer.RetryPolicy` for one run's failed request: the link's backoff and status, then the same
    request. Only `policy.retryable` failures are retried in place; beyond `IN_PLACE_ATTEMPTS` failures
    while Tiled answers, `err` is raised (the scheduler decides it: the run backs off)."""

    def __init__(self, link: TiledLink) -> None:
        self.link = link
        self.failures = 0

    def wait(self, err: Exception) -> None:
        if not retryable(err):
            raise err  # not for an in-place retry: its callers check the same rule first
        self.failures += 1
        if self.failures > IN_PLACE_ATTEMPTS and self.link.reachable():
            raise err
        self.link.wait_before_retry(err)

    def recovered(self) -> None:
        self.failures = 0
        self.link.recovered()
