"""The running ``tiled-writer-sidecar run`` daemon as the end-to-end tests check it.

`make_sidecar` points a real `SidecarProcess` at a proxy and a Tiled;
`rejected_counts` reads its ``/metrics``; `assert_runs_uploaded` is the
contract for valid runs: ``status --json`` shows each ``uploaded`` with
every document the RunEngine emitted (`run_documents`) and no gap, and each
stream is in Tiled row for row (`assert_rows_in_tiled`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import httpx

from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    TiledServer,
    ZmqProxy,
)
from tiled_writer_sidecar.testing.acquisition import Document, expected_rows
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

#: The counter of rejected messages, one sample per reason.
REJECTED = "tiled_writer_sidecar_messages_rejected_total"


class TiledTarget(Protocol):
    """What the daemon needs of a Tiled to write to (a server, a container, a gate in front of one)."""

    @property
    def uri(self) -> str: ...

    @property
    def api_key(self) -> str | None: ...


def make_sidecar(
    tmp_path: Path, proxy: ZmqProxy, tiled: TiledTarget, /, **settings: dict[str, Any]
) -> SidecarProcess:
    """The real daemon (not started yet) on `proxy` and `tiled`, with extra TOML `settings` sections
    (``tiled={...}`` too: the first three arguments are positional-only). A ``spool={"dir": ...}``
    section moves its spool, and `SidecarProcess.spool_dir` (what ``status`` reads) with it."""
    sidecar = SidecarProcess(
        tmp_path / "sidecar",
        zmq_address=proxy.out_address,
        tiled_uri=tiled.uri,
        api_key=tiled.api_key,
        settings=settings or None,
    )
    if "dir" in settings.get("spool", {}):
        sidecar.spool_dir = Path(settings["spool"]["dir"])
    return sidecar


def rejected_counts(sidecar: SidecarProcess) -> dict[str, float]:
    """``{reason: count}`` from the daemon's /metrics, for the reasons counted at least once.

    Every known reason is exported from the start at 0 (so alerts see the first one); those are left out.
    """
    text = httpx.get(sidecar.metrics_url, timeout=10).text
    counts = {m[1]: float(m[2]) for m in re.finditer(REJECTED + r'\{reason="([^"]+)"\} ([0-9.e+]+)', text)}
    return {reason: n for reason, n in counts.items() if n}


def run_documents(docs: Iterable[Document], uid: str) -> list[Document]:
    """The documents of run `uid` (start, descriptors, events, stop) in emission order."""
    docs = list(docs)
    descriptors = {d["uid"] for n, d in docs if n == "descriptor" and d["run_start"] == uid}
    return [
        (n, d)
        for n, d in docs
        if (n == "start" and d["uid"] == uid)
        or (n in ("descriptor", "stop") and d["run_start"] == uid)
        or (n in ("event", "event_page") and d["descriptor"] in descriptors)
    ]


def assert_rows_in_tiled(
    tiled: TiledContainer | TiledServer, acq: Acquisition, uid: str, stream: str = "primary"
) -> int:
    """The stream's rows in Tiled equal, value by value and in order, what the RunEngine emitted
    (at least one row); return how many."""
    expected = expected_rows(acq.documents, stream, run_uid=uid)
    assert expected
    got = frame_rows(read_stream(tiled.client(), uid, stream))
    assert got == expected
    return len(got)


def assert_runs_uploaded(
    sidecar: SidecarProcess,
    tiled: TiledContainer | TiledServer,
    acq: Acquisition,
    uids: list[str],
    *,
    timeout: float = 120,
    only: bool = False,
) -> dict[str, Any]:
    """Every run in `uids` is uploaded, complete, without a gap, and in Tiled row for row, every stream.

    With `only`, the spool holds no other run (a rejected message made no run of
    its own). Returns the ``status --json`` it checked.
    """
    status = sidecar.wait_drained(uids, timeout)
    runs = {r["uid"]: r for r in status["runs"]}
    if only:
        assert sorted(runs) == sorted(uids), "a rejected message made a run of its own"
    for uid in uids:
        docs = run_documents(acq.documents, uid)
        run = runs[uid]
        assert run["state"] == "uploaded", run
        assert run["documents"] == run["uploaded_documents"] == len(docs), run
        assert run["gaps"] == {} and run["problems"] == [], run
        streams = {d["name"] for n, d in docs if n == "descriptor"}
        assert streams
        for stream in streams:
            assert_rows_in_tiled(tiled, acq, uid, stream)
    return status
