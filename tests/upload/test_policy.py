"""The failure table in milliseconds: `decide` follows `OUTCOMES` row by row.

No Tiled and no subprocess: errors are built the way httpx raises them. The
quarantine rule (rejections counted per run) is the scheduler's:
tests/test_uploader.py.
"""

from __future__ import annotations

import errno

import httpx
import pytest

from tests.support.fake_tiled import http_error, transport
from tiled_writer_sidecar.errors import BadRunDocument, TiledUnavailableError, UnsafeName
from tiled_writer_sidecar.upload.policy import (
    OUTCOMES,
    AppendAmbiguous,
    ForeignRun,
    Outcome,
    Stopping,
    TiledDown,
    VerificationFailed,
    decide,
    retryable,
)

CASES: list[tuple[BaseException, Outcome]] = [
    (Stopping(), Outcome.STOP),
    (TiledUnavailableError("gave up"), Outcome.STOP),
    (transport(httpx.ConnectError), Outcome.TILED_DOWN),
    (transport(httpx.ReadTimeout), Outcome.TILED_DOWN),
    (transport(httpx.RemoteProtocolError), Outcome.TILED_DOWN),
    (ConnectionResetError(), Outcome.TILED_DOWN),
    (TimeoutError(), Outcome.TILED_DOWN),
    (TiledDown("no answer"), Outcome.TILED_DOWN),
    (http_error(401), Outcome.UNAUTHORIZED),
    (http_error(403), Outcome.UNAUTHORIZED),
    (http_error(500), Outcome.RETRY),
    (http_error(502), Outcome.RETRY),
    (http_error(503), Outcome.RETRY),
    (http_error(504), Outcome.RETRY),
    (http_error(408), Outcome.RETRY),
    (http_error(429), Outcome.RETRY),
    (AppendAmbiguous("may have landed"), Outcome.REWRITE),
    (VerificationFailed("out of order"), Outcome.REWRITE),
    (OSError(errno.ENOSPC, "No space left on device"), Outcome.REWRITE),
    (MemoryError(), Outcome.REWRITE),
    (http_error(400), Outcome.REJECTED),
    (http_error(404), Outcome.REJECTED),
    (http_error(409), Outcome.REJECTED),
    (ForeignRun("a run with this uid is already in Tiled"), Outcome.QUARANTINE),
    (http_error(422), Outcome.REJECTED),
    (KeyError("descriptor"), Outcome.REJECTED),
    (ValueError("bad shape"), Outcome.REJECTED),
    (UnsafeName("stream name '../x'"), Outcome.QUARANTINE),
    (BadRunDocument("a start of another run"), Outcome.QUARANTINE),
]


@pytest.mark.parametrize(("err", "outcome"), CASES, ids=[f"{type(e).__name__}-{o}" for e, o in CASES])
def test_decide_follows_the_table(err: BaseException, outcome: Outcome) -> None:
    """Each kind of failure gets the outcome `OUTCOMES` lists for it."""
    assert decide(err).outcome is outcome


def test_the_table_has_a_row_for_every_outcome() -> None:
    """The one-screen table names every outcome, each with what leads to it."""
    assert {rule.outcome for rule in OUTCOMES} == set(Outcome)
    assert all(rule.what for rule in OUTCOMES)


def test_outages_and_ambiguous_failures_never_quarantine_at_once() -> None:
    """Only a run's own content is quarantined without a repeat: nothing Tiled or the network did."""
    for err, _ in CASES:
        if not isinstance(err, (UnsafeName, BadRunDocument, ForeignRun)):
            assert decide(err).outcome is not Outcome.QUARANTINE, err


def test_retried_in_place_are_the_request_failures_of_the_rows_retry_and_tiled_down() -> None:
    """`retryable` (what the writer retries in place) agrees with the table: httpx's errors whose outcome is
    RETRY or TILED_DOWN, and no other."""
    for err, outcome in CASES:
        expected = isinstance(err, httpx.HTTPError) and outcome in (Outcome.RETRY, Outcome.TILED_DOWN)
        assert retryable(err) is expected, err
