"""What the uploader does after a failure: the whole policy, one screen (docs/design.md, "Upload").

- `OUTCOMES` is the table (what failed -> `Outcome`); `classify` implements it
  row by row, from the error alone.
- Outages and ambiguous failures never quarantine a run. A rejection does only
  when Tiled repeats it for the same request (`rejection_key`)
  `REJECTIONS_TO_QUARANTINE` times in a row while it answers other requests;
  a run's own bad content (unsafe name, a document of another run) at once.
- `one_line` is how every failure is shown: one escaped, bounded line.
- The uploader's own control-flow exceptions live here too.
"""

from __future__ import annotations

import errno
from enum import StrEnum

import httpx

from .errors import BadRunDocument, TiledUnavailableError, UnsafeName
from .text import clean
from .tiled_run import AppendAmbiguous, retryable

REJECTIONS_TO_QUARANTINE = 3  # the same rejection, in a row, while Tiled answers other requests


class Transient(Exception):
    """Base of the uploader's own transient failures."""


class VerificationFailed(Transient):
    """Tiled's rows for a run differ from what was fed: rewrite the run."""


class RunRejected(Exception):
    """This run cannot be written (kept for callers; `classify` decides from the error itself)."""


class TiledDown(Transient):
    """Tiled was down and still does not answer (checked before connecting again)."""


class Stopping(Exception):
    """The uploader was asked to stop while a request was being retried."""


class Outcome(StrEnum):
    """What the uploader does after a failure (see `OUTCOMES` and `classify`)."""

    STOP = "stop"  # stop uploading; every run stays as it is in the spool
    TILED_DOWN = "tiled down"  # nothing can be uploaded now: back off, probe, reconnect; rewrite the run
    RETRY = "retry"  # Tiled is busy: an append is retried in place, any other request by rewriting the run
    REWRITE = "rewrite"  # the run's state in Tiled is unknown or wrong: delete it there, rewrite it whole
    REJECTED = "rejected"  # rewrite; the same rejection repeated while Tiled answers: quarantine the run
    QUARANTINE = "quarantine"  # the run itself can never be uploaded: quarantine it at once, no request


#: The whole policy, one screen: (what failed, outcome). `classify` implements it row by row.
OUTCOMES: tuple[tuple[str, Outcome], ...] = (
    ("asked to stop; gave up waiting for Tiled (replay)", Outcome.STOP),
    ("connection refused/reset, timeout, DNS; TiledDown; HTTP 401/403 (API key)", Outcome.TILED_DOWN),
    ("HTTP 5xx, 408, 429 (Tiled busy or failing)", Outcome.RETRY),
    ("append that may have landed (AppendAmbiguous); read-back differs", Outcome.REWRITE),
    ("local resource: disk full, read-only, out of memory", Outcome.REWRITE),
    ("any other HTTP 4xx; a document that raises inside TiledWriter", Outcome.REJECTED),
    ("unsafe uid/stream/data key; a document not of this run", Outcome.QUARANTINE),
)

#: OS errors that say nothing about the run (the host is short of something).
_LOCAL_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOMEM, errno.EMFILE})


def classify(err: BaseException) -> Outcome:
    """The outcome of one failure, from the error alone (the table is `OUTCOMES`)."""
    if isinstance(err, (Stopping, TiledUnavailableError)):
        return Outcome.STOP
    if isinstance(err, (TiledDown, httpx.TransportError, ConnectionError, TimeoutError)) or is_auth_error(
        err
    ):
        return Outcome.TILED_DOWN
    if isinstance(err, httpx.HTTPStatusError):
        return Outcome.RETRY if retryable(err) else Outcome.REJECTED
    if isinstance(err, (AppendAmbiguous, VerificationFailed, MemoryError)):
        return Outcome.REWRITE
    if isinstance(err, OSError) and err.errno in _LOCAL_RESOURCE_ERRNOS:
        return Outcome.REWRITE
    if isinstance(err, (UnsafeName, BadRunDocument)):
        return Outcome.QUARANTINE
    return Outcome.REJECTED


def is_auth_error(err: BaseException) -> bool:
    """Tiled refused the API key (HTTP 401/403): an outage of ours, not the run's fault."""
    return isinstance(err, httpx.HTTPStatusError) and err.response.status_code in (401, 403)


def one_line(err: BaseException) -> str:
    """`err` as one safe line (type, first line of its message; escaped and bounded)."""
    text = str(err).strip().splitlines()
    return clean(f"{type(err).__name__}: {text[0] if text else ''}", 300)


def rejection_key(err: BaseException, fed: int) -> str:
    """What makes two rejections "the same request": the position in the log and the failure."""
    if isinstance(err, httpx.HTTPStatusError):
        request = err.request
        return f"{fed} {request.method} {request.url.path} -> {err.response.status_code}"
    return f"{fed} {one_line(err)}"
