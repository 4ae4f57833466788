"""Every failure the sidecar expects, as one exception family.

An expected failure (bad config, spool locked, Tiled unreachable, a bad
message on the wire) is a `SidecarError`; the command line prints its
message as one line and exits with its `exit_code`, never a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SidecarError(Exception):
    """An expected failure, reported to the user as one line."""

    exit_code = 1


class ConfigError(SidecarError):
    """The configuration or the command line is wrong (exit code 2)."""

    exit_code = 2


class SpoolLockedError(SidecarError):
    """Another process already uploads from this spool."""


class SpoolError(SidecarError):
    """The spool directory cannot be used (permissions, disk full, corruption)."""


class TiledUnavailableError(SidecarError):
    """Tiled cannot be reached or answered with a transient error."""


class UnsafeName(SidecarError):
    """A uid, stream name or data key from the spool that could address another Tiled node.

    The run that holds it is quarantined with this reason; no request is made with it.
    """


class BadRunDocument(SidecarError):
    """A document read back from a run's log that does not belong to that run (quarantined)."""


class RejectedMessage(SidecarError):
    """A message from the wire that is not a valid document.

    `reason` is a short, stable, sender-independent code (for example
    ``pickle-forbidden-global`` or ``schema``) used as a metric label and in
    the quarantine; `detail` is a human-readable explanation.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DecodeError(RejectedMessage):
    """The bytes could not be turned into a (name, document) pair safely."""


class ValidationError(RejectedMessage):
    """The document does not follow event-model's schema or run structure."""


class IncompatibleDependency(SidecarError):
    """An installed package lacks what the sidecar relies on (a version outside the supported range)."""
