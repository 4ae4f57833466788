"""How v1_spool/ was made: run with the code of commit e941586 (spool format v1), then committed.

Usage: python make_v1.py tests/spool/data/v1_spool (writes v1_expected.json beside it).
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from tiled_writer_sidecar.spool.codec import pack_document
from tiled_writer_sidecar.spool.segment import FsyncPolicy, LogWriter, list_segments
from tiled_writer_sidecar.spool.state_files import Received

root = Path(sys.argv[1])
runs = root / "runs"
(root / "quarantine").mkdir(parents=True, exist_ok=True)
runs.mkdir(parents=True, exist_ok=True)
expected = {}
rng = np.random.default_rng(12)


def run(uid, n_events, stop=True, torn=False, segment_bytes=4096):
    d = runs / uid
    w = LogWriter(d, segment_bytes, FsyncPolicy("never"))
    docs = [("start", {"uid": uid, "time": 1700000000.0, "scan_id": len(expected) + 1, "plan_name": "count"})]
    desc = f"{uid}-desc"
    docs.append(
        (
            "descriptor",
            {
                "uid": desc,
                "run_start": uid,
                "time": 1700000000.5,
                "name": "primary",
                "data_keys": {
                    "det": {"dtype": "array", "shape": [4, 5], "source": "sim"},
                    "x": {"dtype": "number", "shape": [], "source": "sim"},
                },
                "object_keys": {},
                "configuration": {},
                "hints": {},
            },
        )
    )
    for i in range(1, n_events + 1):
        docs.append(
            (
                "event",
                {
                    "uid": f"{uid}-ev{i}",
                    "descriptor": desc,
                    "seq_num": i,
                    "time": 1700000001.0 + i,
                    "data": {"det": rng.random((4, 5)).astype(np.float32), "x": np.float64(i) * 0.5},
                    "timestamps": {"det": 1700000001.0 + i, "x": 1700000001.0 + i},
                    "filled": {},
                },
            )
        )
    if stop:
        docs.append(
            (
                "stop",
                {
                    "uid": f"{uid}-stop",
                    "run_start": uid,
                    "time": 1700000100.0,
                    "exit_status": "success",
                    "num_events": {"primary": n_events},
                    "reason": "",
                },
            )
        )
    rec = Received(
        uid=uid,
        scan_id=docs[0][1]["scan_id"],
        plan_name="count",
        start_time=1700000000.0,
        first_received=1700000000.0 + len(expected),
        last_received=1700000100.0,
    )
    payloads = [pack_document(n, d_) for n, d_ in docs]
    for p in payloads:
        w.append(p)
    w.close()
    rec.documents = len(docs)
    rec.bytes = sum(len(p) + 10 for p in payloads)
    rec.events = {"primary": n_events}
    rec.stop_received = stop
    rec.closed = stop
    if stop:
        rec.expected_events = {"primary": n_events}
        rec.exit_status = "success"
    rec.save(d)
    torn_bytes = 0
    if torn:  # a crash cut the last record short
        last = list_segments(d)[-1]
        extra = b"\xb1\x5d" + (len(payloads[-1]).to_bytes(4, "little")) + b"\0\0\0\0" + payloads[-1][:50]
        with last.open("ab") as f:
            f.write(extra)
        torn_bytes = len(extra)
    expected[uid] = {
        "names": [n for n, _ in docs],
        "sha256": [hashlib.sha256(p).hexdigest() for p in payloads],
        "segments": len(list_segments(d)),
        "torn_tail": torn_bytes,
    }


run("v1-complete-a", 12)
run("v1-complete-b", 30, segment_bytes=2048)
run("v1-open", 5, stop=False)
run("v1-torn", 7, stop=False, torn=True)
(root.parent / "v1_expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
