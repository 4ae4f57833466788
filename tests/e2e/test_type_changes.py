"""Issue 19: a column whose type changes during a run never stops it.

The sidecar writes a live run's rows as they come (its first row creates the
stream's table, so live subscribers can attach), so a column that starts as
integers and turns to floats later reaches Tiled in a second batch, which
Tiled's int64 table refuses. The
sidecar rewrites that table with the widened type instead; the result must
be what in-process TiledWriter writes when every row arrives in one batch
(its default: 10,000 rows): same tree, same values, same column dtypes.
Where in-process TiledWriter itself fails (a bool column that turns to
integers), the sidecar is exact anyway; a change that is no widening (a
string after integers) quarantines the run at once with its reason, and the
runs behind it are uploaded.

Real processes: the session's Tiled server (one container for the daemon,
one for in-process TiledWriter), bluesky-0MQ-proxy, the daemon; the
documents go out on the standard Publisher.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from bluesky_tiled_plugins import TiledWriter

from tests.support.daemon import make_sidecar
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import differences, tree_summary, without_volatile

Document = tuple[str, dict[str, Any]]
WAVEFORM = 20  # elements: above TiledWriter's MAX_ARRAY_SIZE (16), so an array node, not a table column


def a_run(columns: dict[str, list[Any]], *, shapes: dict[str, list[int]] | None = None) -> list[Document]:
    """start, one ``primary`` descriptor with `columns` as data keys, one event per row, stop."""
    shapes = shapes or {}
    uid, desc, t0 = str(uuid.uuid4()), str(uuid.uuid4()), time.time()
    data_keys = {
        key: {
            "dtype": "array" if key in shapes else "number",
            "shape": shapes.get(key, []),
            "source": f"SIM:{key}",
        }
        for key in columns
    }
    docs: list[Document] = [
        ("start", {"uid": uid, "time": t0, "scan_id": 1, "plan_name": "count"}),
        (
            "descriptor",
            {
                "uid": desc,
                "run_start": uid,
                "time": t0,
                "name": "primary",
                "data_keys": data_keys,
                "object_keys": {"det": list(columns)},
                "configuration": {},
                "hints": {},
            },
        ),
    ]
    rows = len(next(iter(columns.values())))
    for i in range(rows):
        data = {key: values[i] for key, values in columns.items()}
        event = {
            "uid": str(uuid.uuid4()),
            "descriptor": desc,
            "time": t0 + 0.01 * (i + 1),
            "seq_num": i + 1,
            "data": data,
            "timestamps": dict.fromkeys(data, t0),
            "filled": {},
        }
        docs.append(("event", event))
    stop = {"uid": str(uuid.uuid4()), "run_start": uid, "time": t0 + 1, "exit_status": "success"}
    docs.append(("stop", {**stop, "num_events": {"primary": rows}}))
    return docs


def column_types(client: Any, uid: str) -> dict[str, str]:
    """The Arrow type of every column of the run's ``primary`` table, and the dtype of each array node."""
    stream = client[uid]["primary"].base
    types = {f.name: str(f.type) for f in stream["internal"].structure().arrow_schema_decoded}
    types.update({key: str(stream[key].dtype) for key in stream if key != "internal"})
    return types


def column_values(client: Any, uid: str) -> dict[str, list[Any]]:
    """Every value of the run's ``primary`` stream by column (NaN as None, arrays as lists)."""
    stream = client[uid]["primary"].base
    frame = stream["internal"].read()
    values = {str(c): [None if v != v else v for v in frame[c].tolist()] for c in frame.columns}
    values.update({key: stream[key].read().tolist() for key in stream if key != "internal"})
    return values


def publish(acquisition: Acquisition, docs: list[Document]) -> None:
    """Send `docs` on the acquisition's standard Publisher, as a RunEngine does."""
    assert acquisition.publisher is not None
    for name, doc in docs:
        acquisition.publisher(name, doc)


def has_table(client: Any, uid: str) -> bool:
    """Whether the run's ``primary`` stream has its table in Tiled (its first row was written)."""
    return uid in client and "primary" in client[uid] and "internal" in client[uid]["primary"].base


def run_states(sidecar: SidecarProcess, wanted: dict[str, str], timeout: float = 180.0) -> dict[str, Any]:
    """Poll ``status --json`` until every run in `wanted` is in its state; return the runs by uid."""
    runs: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal runs
        runs = {run["uid"]: run for run in sidecar.status()["runs"]}
        return all(runs.get(uid, {}).get("state") == state for uid, state in wanted.items())

    try:
        wait_until(reached, timeout, interval=0.5, what=f"runs in states {wanted}")
    except Exception:
        print({uid: runs.get(uid) for uid in wanted}, sidecar.log_tail(60))
        raise
    return runs


@pytest.mark.timeout(900)  # Tiled, the proxy and the sidecar start cold on a loaded 2-core machine
def test_widened_columns_end_exact_with_in_process_types_and_other_runs_flow(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """int -> float (scalar and waveform) and null -> int -> float: identical to in-process TiledWriter
    with one batch, values exact; bool -> int (in-process fails) exact as int64; a string after
    integers quarantined naming the column; good runs around them uploaded and identical."""
    widening = a_run(
        {
            "counter": [0, 3.5, 4, 7, 8.25],  # an ophyd counter: reads 0, then 3.5
            "late": [None, None, 3, 4.5, 5],  # no value until the third row
            "steady": [1, 2, 3, 4, 5],
            "wave": [
                list(range(WAVEFORM)),
                [x + 0.5 for x in range(WAVEFORM)],
                *([list(range(WAVEFORM))] * 3),
            ],
        },
        shapes={"wave": [WAVEFORM]},
    )
    flags = a_run({"flag": [True, 1, 2, False]})  # in-process TiledWriter: ArrowInvalid
    strings = a_run({"reading": [1, 2, "overrange", 4]})  # not a widening
    good = [a_run({"det": [float(i) for i in range(5)], "n": list(range(5))}) for _ in range(2)]
    runs = [good[0], widening, flags, strings, *good[1:]]

    inprocess_root = tiled_container.server.client().create_container(f"{tmp_path.name}-inprocess")
    sidecar = make_sidecar(tmp_path, proxy, tiled_container)
    with sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        uid = {id(docs): docs[0][1]["uid"] for docs in runs}
        for docs in runs:
            # As acquired: the first row reaches Tiled alone (live), the others after it.
            publish(acquisition, docs[:3])
            if docs is not good[0]:
                run = uid[id(docs)]
                wait_until(
                    lambda run=run: has_table(tiled_container.client(), run), 120, what="the first row"
                )
            publish(acquisition, docs[3:])
        states = run_states(
            sidecar,
            {uid[id(docs)]: "quarantined" if docs is strings else "uploaded" for docs in runs},
        )
        log = sidecar.log_tail(2000)
    # The widening really happened across batches (the table was rewritten), not in one batch.
    assert "counter int64 -> double" in log and "flag bool -> int64" in log, log
    assert (
        "'reading'" in states[uid[id(strings)]]["reason"]
        and "not a widening" in states[uid[id(strings)]]["reason"]
    )

    writer = TiledWriter(inprocess_root)
    for docs in [widening, *good]:
        for name, doc in docs:
            writer(name, doc)
    ours, theirs = tiled_container.client(), inprocess_root
    for docs in [widening, *good]:
        run = uid[id(docs)]
        assert (
            differences(
                without_volatile(tree_summary(ours, run)), without_volatile(tree_summary(theirs, run))
            )
            == []
        )
        assert column_types(ours, run) == column_types(theirs, run)
        assert column_values(ours, run) == column_values(theirs, run)
    run = uid[id(widening)]
    assert column_types(ours, run)["counter"] == "double" and column_types(ours, run)["late"] == "double"
    assert column_types(ours, run)["steady"] == "int64" and column_types(ours, run)["wave"] == "float64"
    assert column_values(ours, run)["counter"] == [0, 3.5, 4, 7, 8.25]
    assert column_values(ours, run)["late"] == [None, None, 3, 4.5, 5]
    assert column_values(ours, run)["wave"][1] == [x + 0.5 for x in range(WAVEFORM)]
    assert column_types(ours, uid[id(flags)])["flag"] == "int64"
    assert column_values(ours, uid[id(flags)])["flag"] == [1, 1, 2, 0]
