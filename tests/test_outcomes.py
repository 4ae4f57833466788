"""The uploader's failure policy in milliseconds: `classify`, the quarantine rule, backoff, order checks.

No Tiled and no subprocess: errors are built the way httpx raises them, the
uploader runs on an empty spool in tmp_path, and "is Tiled answering other
requests" (`_tiled_reachable`) is set by each test.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import httpx
import pytest

from tiled_writer_sidecar.backoff import Backoff
from tiled_writer_sidecar.config import Config, SpoolConfig
from tiled_writer_sidecar.errors import BadRunDocument, TiledUnavailableError, UnsafeName
from tiled_writer_sidecar.outcomes import (
    OUTCOMES,
    REJECTIONS_TO_QUARANTINE,
    Outcome,
    Stopping,
    TiledDown,
    VerificationFailed,
    classify,
)
from tiled_writer_sidecar.run_upload import SeqNums
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.index import Received, RunView, Uploaded
from tiled_writer_sidecar.tiled_run import AppendAmbiguous
from tiled_writer_sidecar.uploader import Uploader

URL = "http://127.0.0.1:8000/api/v1/table/partition/run/primary/internal"


def http_error(code: int, method: str = "PATCH", url: str = URL) -> httpx.HTTPStatusError:
    request = httpx.Request(method, url)
    return httpx.HTTPStatusError(f"{code}", request=request, response=httpx.Response(code, request=request))


def transport(cls: type[httpx.TransportError]) -> httpx.TransportError:
    return cls("boom", request=httpx.Request("GET", URL))


CASES: list[tuple[BaseException, Outcome]] = [
    (Stopping(), Outcome.STOP),
    (TiledUnavailableError("gave up"), Outcome.STOP),
    (transport(httpx.ConnectError), Outcome.TILED_DOWN),
    (transport(httpx.ReadTimeout), Outcome.TILED_DOWN),
    (transport(httpx.RemoteProtocolError), Outcome.TILED_DOWN),
    (ConnectionResetError(), Outcome.TILED_DOWN),
    (TimeoutError(), Outcome.TILED_DOWN),
    (TiledDown("no answer"), Outcome.TILED_DOWN),
    (http_error(401), Outcome.TILED_DOWN),
    (http_error(403), Outcome.TILED_DOWN),
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
    (http_error(422), Outcome.REJECTED),
    (KeyError("descriptor"), Outcome.REJECTED),
    (ValueError("bad shape"), Outcome.REJECTED),
    (UnsafeName("stream name '../x'"), Outcome.QUARANTINE),
    (BadRunDocument("a start of another run"), Outcome.QUARANTINE),
]


@pytest.mark.parametrize(("err", "outcome"), CASES, ids=[f"{type(e).__name__}-{o}" for e, o in CASES])
def test_classify_follows_the_table(err: BaseException, outcome: Outcome) -> None:
    """Each kind of failure gets the outcome `OUTCOMES` lists for it."""
    assert classify(err) is outcome


def test_the_table_has_a_row_for_every_outcome() -> None:
    """The one-screen table names every outcome, each with what leads to it."""
    assert {outcome for _, outcome in OUTCOMES} == set(Outcome)
    assert all(text for text, _ in OUTCOMES)


def test_outages_and_ambiguous_failures_never_quarantine_at_once() -> None:
    """Only a run's own content is quarantined without a repeat: nothing Tiled or the network did."""
    for err, _ in CASES:
        if not isinstance(err, (UnsafeName, BadRunDocument)):
            assert classify(err) is not Outcome.QUARANTINE, err


# ----------------------------------------------------------------- the quarantine rule


@pytest.fixture
def uploader(tmp_path: Path) -> Uploader:
    spool = SpoolDir(tmp_path / "spool")
    return Uploader(Config(spool=SpoolConfig(dir=str(spool.root))), spool)


def planted_run(uploader: Uploader, uid: str = "run-1") -> RunView:
    directory = uploader.spool.runs_dir / uid
    directory.mkdir()
    received = Received(uid=uid, closed=True)
    received.save(directory)
    Uploaded(state="uploading").save(directory)
    return RunView(directory, received, Uploaded.load(directory))


def fail(uploader: Uploader, view: RunView, err: Exception, fed: int = 7) -> bool:
    """Report one failure of `view`'s upload; True if the uploader re-raised it (backoff, rewrite)."""
    try:
        uploader._run_failed(view, err, fed=fed)
    except Exception as raised:  # noqa: BLE001 - the test inspects what came back
        assert raised is err
        return True
    return False


def reachable(uploader: Uploader, answers: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploader.link, "reachable", lambda: answers)


def test_the_same_rejection_repeated_while_tiled_answers_quarantines_with_the_reason(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """N-1 times: rewrite (re-raised); the N-th time in a row: quarantined, reason in uploaded.json."""
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader)
    for _ in range(REJECTIONS_TO_QUARANTINE - 1):
        assert fail(uploader, view, http_error(422))
        assert Uploaded.load(view.directory).state == "uploading"
    assert not fail(uploader, view, http_error(422))
    uploaded = Uploaded.load(view.directory)
    assert uploaded.state == "quarantined"
    assert uploaded.reason is not None and "422" in uploaded.reason
    assert f"rejected {REJECTIONS_TO_QUARANTINE} times" in uploaded.reason
    assert uploader.status.runs_quarantined == 1


def test_rejections_while_tiled_does_not_answer_never_count(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4xx seen while Tiled's root does not answer may be a proxy's: never counted."""
    reachable(uploader, False, monkeypatch)
    view = planted_run(uploader)
    for _ in range(REJECTIONS_TO_QUARANTINE * 3):
        assert fail(uploader, view, http_error(404))
    assert Uploaded.load(view.directory).state == "uploading"


def test_different_rejections_do_not_add_up(uploader: Uploader, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rejection at another place in the log (the rewrite got further) starts counting again."""
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader)
    for fed in range(REJECTIONS_TO_QUARANTINE * 3):
        assert fail(uploader, view, http_error(400), fed=fed)
    assert Uploaded.load(view.directory).state == "uploading"


@pytest.mark.parametrize(
    "err",
    [http_error(500), http_error(502), transport(httpx.ConnectError), transport(httpx.ReadTimeout)],
    ids=["500", "502", "connect", "read-timeout"],
)
def test_a_tiled_that_keeps_failing_never_quarantines_a_run(
    err: Exception, uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: ten (here thirty) crashes of Tiled mid-upload leave the run to be rewritten, not quarantined."""
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader)
    for _ in range(30):
        assert fail(uploader, view, err)
    assert Uploaded.load(view.directory).state == "uploading"
    assert uploader.status.runs_quarantined == 0


def test_the_runs_own_bad_content_is_quarantined_at_once(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unsafe name needs no repeat and no request to Tiled."""
    reachable(uploader, False, monkeypatch)
    view = planted_run(uploader)
    assert not fail(uploader, view, UnsafeName("stream name '../other/primary' could address another node"))
    uploaded = Uploaded.load(view.directory)
    assert uploaded.state == "quarantined" and "../other/primary" in (uploaded.reason or "")
    assert "run-1" in uploader.done


def test_a_planted_run_directory_with_an_unsafe_uid_is_quarantined_not_activated(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A uid with a trailing newline (as `is_safe_uid` used to let through) never reaches Tiled."""
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader, "0123-abcd\n")
    uploader.link.client = object()  # any request would fail loudly: none must be made
    uploader._schedule()
    assert not uploader.active
    uploaded = Uploaded.load(view.directory)
    assert uploaded.state == "quarantined" and "not a safe Tiled key" in (uploaded.reason or "")


def test_received_json_naming_another_run_is_quarantined(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader, "run-a")
    Received(uid="run-b", closed=True).save(view.directory)
    uploader.link.client = object()
    uploader._schedule()
    assert Uploaded.load(view.directory).state == "quarantined"


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


def test_seq_nums_compare_in_order() -> None:
    """Verification compares order, not only the set: a moved row is a difference."""
    fed = SeqNums.of([1, 2, 3, 4, 5])
    assert fed.ranges == [[1, 5]] and fed.count == 5
    assert SeqNums.of([1, 2, 3, 4, 5]) == fed
    assert SeqNums.of([1, 2, 4, 3, 5]) != fed
    assert "out of order (row 2 holds seq_num 4)" in fed.describe_difference([1, 2, 4, 3, 5])
    assert "1 duplicated" in fed.describe_difference([1, 2, 3, 4, 4, 5])
    assert "Tiled holds 4 rows" in fed.describe_difference([1, 2, 3, 4])


def test_seq_nums_keep_duplicates_and_gaps_as_fed() -> None:
    """What a publisher sent (holes, repeats) is what Tiled must hold: no endless rewrite for it."""
    values: list[Any] = [1, 2, 2, 5, 6, 3]
    assert SeqNums.of(values).values() == values
