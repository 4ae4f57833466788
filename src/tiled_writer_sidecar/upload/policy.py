"""What the uploader does after a failure: the whole policy, one table (docs/design.md, "Upload").

- `OUTCOMES` is the table: each `Rule` says which failures it covers, their
  `Outcome`, and after how many identical failures in a row (`repeats`) the
  run is quarantined. `decide` returns the first rule that matches, once per
  failure; the callers branch on its outcome: the scheduler
  (`scheduler._run_failed`, `Uploader.run`), the link (`TiledLink.failed`) and
  the in-place retry (`connection.InPlaceRetry`). A failure the scheduler
  hands up to its loop goes up as `Decided`, with its rule. The scheduler
  and the link match every outcome (`assert_never`): a new one fails mypy
  until both say what it does.
- A failure is the run's own problem unless Tiled is down (its root does
  not answer, or a lookup in its catalog fails: its database is down) or
  refuses the API key: then everyone pauses and nothing is counted.
  Otherwise the run backs off on its own (the others go on) and the
  failure counts: the same failure (`failure_key`) `repeats` times in a row,
  or `MAX_RUN_FAILURES` failures of any kind, quarantine it with a one-line
  reason. A run's own bad content (unsafe name, a document of another run,
  a uid Tiled holds from another writer) is quarantined at once.
- `retryable` is the request-level rule the writer retries in place by (the
  rows RETRY and TILED_DOWN, for httpx's errors).
- `one_line` is how every failure is shown: one escaped, bounded line.
- The uploader's own control-flow exceptions live here too.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import httpx

from tiled_writer_sidecar.errors import BadRunDocument, TiledUnavailableError, UnsafeName
from tiled_writer_sidecar.text import one_line as one_line  # the one rule, re-exported for the upload side

MAX_RUN_FAILURES = 8  # failures of one run, of any kind, while Tiled answers: then it is quarantined


class Transient(Exception):
    """Base of the uploader's own transient failures."""


class VerificationFailed(Transient):
    """Tiled's rows for a run differ from what was fed: rewrite the run."""


class ForeignRun(Exception):
    """Tiled already holds a run with this uid, and this spool did not create it: never touch it."""


class TiledDown(Transient):
    """Tiled was down and still does not answer (checked before connecting again)."""


class Stopping(Exception):
    """The uploader was asked to stop while a request was being retried."""


class AppendAmbiguous(Exception):
    """An append failed and Tiled's table does not tell whether it landed: rewrite the run."""


class Outcome(StrEnum):
    """What the uploader does after a failure (see `OUTCOMES`)."""

    STOP = "stop"  # stop uploading; every run stays as it is in the spool
    UNAUTHORIZED = "unauthorized"  # Tiled refuses the API key: everyone pauses, nothing is counted
    TILED_DOWN = "tiled down"  # Tiled does not answer: everyone pauses; else the run backs off alone
    RETRY = "retry"  # Tiled failed the request: retried in place a few times, then the run backs off
    REWRITE = "rewrite"  # the run's state in Tiled is unknown or wrong: the run is rewritten whole
    REJECTED = "rejected"  # Tiled or TiledWriter refused the run's documents: rewrite, then quarantine
    QUARANTINE = "quarantine"  # the run itself can never be uploaded: quarantine it at once


@dataclass(frozen=True)
class Rule:
    """One row of `OUTCOMES`: what failed, its outcome, and the repeats that quarantine the run."""

    what: str
    outcome: Outcome
    matches: Callable[[BaseException], bool]
    repeats: int | None  # the same failure this many times in a row -> quarantine; None: never counted


def _is(*types: type[BaseException]) -> Callable[[BaseException], bool]:
    return lambda err: isinstance(err, types)


def _refused_key(err: BaseException) -> bool:
    """Tiled refused the API key (HTTP 401/403): an outage of ours, not the run's fault."""
    return isinstance(err, httpx.HTTPStatusError) and err.response.status_code in (401, 403)


def _local_resource(err: BaseException) -> bool:
    """The host is short of something (disk, memory, files): says nothing about the run."""
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, OSError) and err.errno in _LOCAL_RESOURCE_ERRNOS


def _http_status(err: BaseException) -> bool:
    return isinstance(err, httpx.HTTPStatusError)


def _busy(err: BaseException) -> bool:
    """Tiled answered that it is failing or busy: HTTP 5xx, 408, 429."""
    if not isinstance(err, httpx.HTTPStatusError):
        return False
    code = err.response.status_code
    return code >= 500 or code in (408, 429)


def retryable(err: BaseException) -> bool:
    """A request's failure that may go away by itself (Tiled unreachable, overloaded or busy): the
    failures of the rows RETRY and TILED_DOWN that httpx raises, which the writer retries in place."""
    return _busy(err) or isinstance(err, httpx.TransportError)


#: OS errors that say nothing about the run (the host is short of something).
_LOCAL_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOMEM, errno.EMFILE})

#: The whole policy, one screen; the first row that matches decides.
OUTCOMES: tuple[Rule, ...] = (
    Rule(
        "asked to stop; gave up waiting for Tiled (replay)",
        Outcome.STOP,
        _is(Stopping, TiledUnavailableError),
        None,
    ),
    Rule("Tiled refused the API key (HTTP 401/403)", Outcome.UNAUTHORIZED, _refused_key, None),
    Rule(
        "connection refused/reset, timeout, DNS; TiledDown",
        Outcome.TILED_DOWN,
        _is(TiledDown, httpx.TransportError, ConnectionError, TimeoutError),
        5,
    ),
    Rule("HTTP 5xx, 408, 429 (Tiled busy or failing)", Outcome.RETRY, _busy, 5),
    Rule("the read-back differs from what was fed", Outcome.REWRITE, _is(VerificationFailed), 2),
    Rule("an append that may have landed (AppendAmbiguous)", Outcome.REWRITE, _is(AppendAmbiguous), 3),
    Rule("local resource: disk full, read-only, out of memory", Outcome.REWRITE, _local_resource, None),
    Rule(
        "unsafe uid/stream/data key; a document not of this run; a run Tiled holds from another writer",
        Outcome.QUARANTINE,
        _is(UnsafeName, BadRunDocument, ForeignRun),
        None,
    ),
    Rule("any other HTTP 4xx", Outcome.REJECTED, _http_status, 2),
    Rule("a document that raises inside TiledWriter or its normalizer", Outcome.REJECTED, lambda e: True, 2),
)


def decide(err: BaseException) -> Rule:
    """The row of `OUTCOMES` for one failure, from the error alone."""
    return next(rule for rule in OUTCOMES if rule.matches(err))


class Decided(Exception):
    """A failure and its rule, decided already: how the scheduler hands a run's failure up to its loop
    (everyone pauses, or the uploader stops) without deciding it again."""

    def __init__(self, err: Exception, rule: Rule) -> None:
        super().__init__(one_line(err))
        self.err = err
        self.rule = rule


def failure_key(err: BaseException, fed: int) -> str:
    """What makes two failures "the same": the position in the log and the failure."""
    if isinstance(err, httpx.HTTPStatusError):
        request = err.request
        return f"{fed} {request.method} {request.url.path} -> {err.response.status_code}"
    return f"{fed} {one_line(err)}"
