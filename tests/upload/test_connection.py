"""The Tiled link in milliseconds: state changes, retries in place, giving up, the backoff.

No Tiled: whether the server answers (`TiledLink.reachable`) is set by each
test, and `connect` is replaced where a test needs a client. The status the
link reports into is a real `UploaderStatus`.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from tests.support.fake_tiled import http_error, transport
from tiled_writer_sidecar.backoff import Backoff
from tiled_writer_sidecar.config import Config, TiledConfig
from tiled_writer_sidecar.errors import TiledUnavailableError
from tiled_writer_sidecar.spool.state_files import UploaderStatus
from tiled_writer_sidecar.upload import connection
from tiled_writer_sidecar.upload.connection import InPlaceRetry, TiledLink
from tiled_writer_sidecar.upload.policy import Stopping, TiledDown, decide


class Link:
    """A TiledLink with a fast backoff, whose reports are counted and whose Tiled answers on demand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, give_up_after: float | None = None) -> None:
        self.status = UploaderStatus()
        self.reports = 0
        self.answers = True
        self.stop = threading.Event()
        config = Config(tiled=TiledConfig(backoff_initial_seconds=0.001, backoff_max_seconds=0.002))
        self.link = TiledLink(
            config, self.status, stop=self.stop, report=self.report, give_up_after=give_up_after
        )
        monkeypatch.setattr(self.link, "reachable", lambda: self.answers)
        self.link.busy_backoff = Backoff(0.001, 0.002)

    def report(self) -> None:
        self.reports += 1


def failed(link: Link, err: Exception) -> None:
    """What the scheduler does with a step's failure: decide it once, hand the rule to the link."""
    link.link.failed(err, decide(err))


@pytest.fixture
def link(monkeypatch: pytest.MonkeyPatch) -> Link:
    return Link(monkeypatch)


def test_connected_builds_a_client_once_and_says_up(link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step connects; later steps reuse the client."""
    made: list[Any] = []
    monkeypatch.setattr(connection, "connect", lambda config: made.append(object()) or made[-1])
    assert link.link.connected() is link.link.connected() is made[0]
    assert len(made) == 1 and link.status.tiled == "up"


def test_while_tiled_is_down_no_client_is_built_until_it_answers(
    link: Link, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Down and not answering: TiledDown without building a client (a client costs ~20 ms of CPU)."""
    monkeypatch.setattr(connection, "connect", lambda config: pytest.fail("connected while down"))
    link.answers = False
    failed(link, transport(httpx.ConnectError))
    assert link.status.tiled == "down" and link.link.client is None and link.reports == 1
    with pytest.raises(TiledDown):
        link.link.connected()
    link.answers = True
    monkeypatch.setattr(connection, "connect", lambda config: "client")
    assert link.link.connected() == "client"
    link.link.recovered()
    assert link.status.tiled == "up" and link.status.retries == 1


def test_a_refused_api_key_is_unauthorized_not_down(link: Link) -> None:
    """401/403: the client is dropped and the state says to check the key."""
    link.link.client = object()
    failed(link, http_error(401))
    assert link.status.tiled == "unauthorized" and link.link.client is None
    assert "401" in (link.status.last_error or "")


def test_a_failure_while_tiled_answers_keeps_it_up(link: Link) -> None:
    """A 500 with Tiled's root answering: counted and shown, the client kept, the state unchanged."""
    client = link.link.client = object()
    link.status.tiled = "up"
    failed(link, http_error(500))
    assert link.status.tiled == "up" and link.link.client is client and link.status.retries == 1
    assert "500" in (link.status.last_error or "")


def test_in_place_retry_talks_to_the_link(link: Link) -> None:
    """run_writer's RetryPolicy: each wait counts an append retry and reports; Tiled not answering
    means down; success after failures resets the backoff and says up again."""
    retry = InPlaceRetry(link.link)
    link.link.client = object()
    link.status.tiled = "up"
    retry.wait(http_error(503))
    assert link.status.append_retries == 1 and link.status.tiled == "up" and link.reports == 1
    link.answers = False
    retry.wait(transport(httpx.ReadTimeout))
    assert link.status.append_retries == 2 and link.status.tiled == "down"
    retry.recovered()
    assert link.status.tiled == "up" and link.link.backoff.attempt == 0


def test_a_stop_interrupts_a_retry(link: Link) -> None:
    """Asked to stop while an append waits: Stopping, so the run stays as it is in the spool."""
    link.stop.set()
    with pytest.raises(Stopping):
        link.link.wait_before_retry(http_error(503))


def test_give_up_after_raises_once_failing_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """replay's give_up_after: failing longer than it ends the upload with one clear error."""
    link = Link(monkeypatch, give_up_after=0.0)
    link.answers = False
    failed(link, transport(httpx.ConnectError))  # the first failure starts the clock
    with pytest.raises(TiledUnavailableError, match="giving up"):
        failed(link, transport(httpx.ConnectError))


# ----------------------------------------------------------------- backoff and order


def test_backoff_is_exponential_with_equal_jitter_capped_and_reset() -> None:
    """Delay n is in [c/2, c], c = min(max, initial * 2**n); reset starts again from initial."""
    backoff = Backoff(0.5, 4.0)
    for n in range(8):
        ceiling = min(4.0, 0.5 * 2**n)
        delay = backoff.next_delay()
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert 0.25 <= backoff.next_delay() <= 0.5


def test_backoff_survives_a_huge_attempt_count() -> None:
    backoff = Backoff(0.5, 30.0, attempt=10_000)
    assert 15.0 <= backoff.next_delay() <= 30.0


@pytest.mark.parametrize(
    ("root", "lookup", "serving"),
    [(200, 404, True), (200, 200, True), (200, 401, True), (200, 500, False), (503, 404, False)],
    ids=["lookup-not-found", "lookup-found", "lookup-unauthorized", "database-down", "root-failing"],
)
def test_reachable_means_the_root_and_a_catalog_lookup_answer(
    root: int, lookup: int, serving: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiled up with its database down answers its root but 500 on every lookup: that is an outage
    (everyone pauses, no run's failure counted), not one run's problem; a 404 on the lookup is an answer."""
    seen: list[tuple[str, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        return httpx.Response(root if request.url.path == "/api/v1/" else lookup)

    monkeypatch.setenv("TILED_API_KEY", "secret")
    config = Config(tiled=TiledConfig(uri="http://127.0.0.1:9/"))
    link = TiledLink(config, UploaderStatus(), stop=threading.Event(), report=lambda: None)
    link._probe = httpx.Client(transport=httpx.MockTransport(answer))
    assert link.reachable() is serving
    assert seen[0] == ("/api/v1/", None)
    if root < 500:
        assert seen[1] == (connection.PROBE_LOOKUP, "Apikey secret")
    else:
        assert len(seen) == 1
