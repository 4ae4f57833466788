"""3. Backlog drain: a spooled backlog of several runs uploaded once Tiled is back, vs in-process TiledWriter.

The backlog (several runs of scalar events, 100,000 events in all) is
spooled once by the sidecar's own `Receiver` (as if Tiled had been down
while they were acquired). In every repetition, side by side against the
same Tiled server, each configuration writes the same documents into its own
fresh container:

- ``inprocess``: ``TiledWriter(client)`` with its defaults (batch_size
  10,000, jsonschema-validating `RunNormalizer`), fed the documents from
  memory: what ``RE.subscribe(TiledWriter(client))`` does;
- ``sidecar``: the daemon's `Uploader` on a copy of the spool, default
  settings (batch_rows 10,000, one verification request per stream);
- ``sidecar_all_ideas``: ``batch_rows`` 50,000 (one append per run) + two
  uploaders in two threads on half the runs each.

Rows/s = rows / wall time of the upload (imports, connecting and reading
the documents into memory excluded). Also: the CPU time of this process and
of the Tiled server during each upload, HTTP requests and the time spent
waiting for them, Tiled's 5xx answers (forced retries), and the parity
check: every run of ``sidecar`` against ``inprocess`` with the parity test's
`tree_summary` and row-by-row comparison (first repetition; one run per
variant). Each side is also profiled once, on one run (cProfile).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from ._upload import inprocess_upload, read_documents, sidecar_upload
from .common import Bench, cpu_seconds, profile_summary, summary, synthetic_run

NAME = "backlog_drain"
TITLE = "Backlog drain into Tiled"
TARGET = ">= 5x in-process TiledWriter (batch 10000) rows/s, parity test green"
CONFIGS = ("inprocess", "sidecar", "sidecar_all_ideas")
OPTIONS: dict[str, dict[str, Any]] = {
    "sidecar": {},
    "sidecar_all_ideas": {"batch_rows": 50_000, "threads": 2},
}


class _RetryCounter(logging.Handler):
    """Counts TiledWriter's "forcing a retry" warnings (Tiled answered 5xx to an append)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.sample = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "forcing a retry" in message:
            self.count += 1
            self.sample = self.sample or message[:300]


def make_backlog(root: Path, runs: int, events: int) -> dict[str, Any]:
    """Spool `runs` runs of `events` events through the receiver's `Ingest`; return counts and speed."""
    from tiled_writer_sidecar.config import SpoolConfig
    from tiled_writer_sidecar.receive.counters import ReceiverStats
    from tiled_writer_sidecar.receive.ingest import Ingest
    from tiled_writer_sidecar.spool.directory import SpoolDir

    ingest = Ingest(SpoolConfig(dir=str(root)), SpoolDir(root), ReceiverStats())
    documents = 0
    seconds = 0.0
    for i in range(runs):
        batch = list(synthetic_run(events, scan_id=i + 1))
        t0 = time.perf_counter()
        for name, doc in batch:
            ingest.accept(name, doc)
        seconds += time.perf_counter() - t0
        documents += len(batch)
    ingest.shutdown()
    return {"runs": runs, "events": runs * events, "documents": documents, "accept_rate": documents / seconds}


def parity(client: Any, ours: str, theirs: str, uids: list[str]) -> list[str]:
    """Differences between two containers' copies of `uids` (the parity test's checks)."""
    from tiled_writer_sidecar.testing.tiled_readback import (
        frame_rows,
        read_stream,
        tree_summary,
        without_volatile,
    )

    problems = []
    for uid in uids:
        a = without_volatile(tree_summary(client[ours], uid))
        b = without_volatile(tree_summary(client[theirs], uid))
        if a != b:
            keys = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
            problems.append(f"{ours}/{uid}: tree differs in {sorted(keys)}")
            continue
        for stream in b["streams"]:
            if b["streams"][stream]["columns"] and frame_rows(
                read_stream(client[ours], uid, stream, arrays=False)
            ) != frame_rows(read_stream(client[theirs], uid, stream, arrays=False)):
                problems.append(f"{ours}/{uid}/{stream}: rows differ")
    return problems


def run(bench: Bench) -> dict[str, Any]:
    from tiled.client import from_uri

    n_runs = bench.size(5, 2)
    n_events = bench.size(20_000, 300)
    tiled = bench.tiled()
    root_client = tiled.client()
    source = bench.workdir / "backlog-source"
    backlog = make_backlog(source, n_runs, n_events)
    bench.log(f"  backlog: {n_runs} runs x {n_events} events spooled ({backlog['accept_rate']:,.0f} docs/s)")
    retries = _RetryCounter()
    logging.getLogger("bluesky_tiled_plugins").addHandler(retries)
    logging.getLogger("bluesky_tiled_plugins").setLevel(logging.WARNING)
    reps: list[dict[str, Any]] = []
    parity_problems: list[str] = []
    variant_problems: list[str] = []
    uids: list[str] = []

    def one(rep: int, config: str) -> dict[str, Any]:
        container = f"drain{rep}-{config}"
        root_client.create_container(container)
        uri = f"{tiled.uri}/api/v1/metadata/{container}"
        before_retries = retries.count
        server0 = cpu_seconds(tiled.pid) or 0.0
        if config == "inprocess":
            documents = read_documents(source)
            client = from_uri(uri, api_key=tiled.api_key)
            result = inprocess_upload(documents, client)
            client.context.close()
        else:
            spool = bench.workdir / f"drain-{rep}-{config}"
            shutil.copytree(source, spool)
            result = sidecar_upload(spool, uri, api_key=tiled.api_key, **OPTIONS[config])
            if not result["all_uploaded"]:
                raise RuntimeError(f"{config}: not every run was uploaded: {result}")
            shutil.rmtree(spool, ignore_errors=True)
            for part in spool.parent.glob(f"{spool.name}.part*"):
                shutil.rmtree(part, ignore_errors=True)
        result["server_cpu_seconds"] = (cpu_seconds(tiled.pid) or 0.0) - server0
        result["tiled_5xx_retries"] = retries.count - before_retries
        result["rows_per_s"] = result["rows"] / result["seconds"]
        result["container"] = container
        return result

    try:
        for rep in range(bench.reps):
            order = CONFIGS[rep % len(CONFIGS) :] + CONFIGS[: rep % len(CONFIGS)]
            results = {config: one(rep, config) for config in order}
            base = results["inprocess"]["rows_per_s"]
            ratios = {c: results[c]["rows_per_s"] / base for c in CONFIGS}
            reps.append({"results": results, "ratios": ratios})
            bench.log(
                f"  rep {rep + 1}: "
                + ", ".join(f"{c} {results[c]['rows_per_s']:,.0f} rows/s (x{ratios[c]:.2f})" for c in CONFIGS)
            )
            if rep == 0:
                uids = list(root_client[results["inprocess"]["container"]])
                t0 = time.monotonic()
                parity_problems += parity(
                    root_client, results["sidecar"]["container"], results["inprocess"]["container"], uids
                )
                for config in CONFIGS[2:]:
                    variant_problems += parity(
                        root_client, results[config]["container"], results["inprocess"]["container"], uids[:1]
                    )
                bench.log(
                    f"  parity: sidecar {len(parity_problems)} difference(s), variants {len(variant_problems)}"
                    f" ({time.monotonic() - t0:.0f} s)"
                )
        profiles = _profiles(bench, tiled, root_client, source)
        server_log = tiled.log_path.read_text(errors="replace")
    finally:
        logging.getLogger("bluesky_tiled_plugins").removeHandler(retries)

    def per(key: str) -> dict[str, Any]:
        return {c: summary([r["results"][c][key] for r in reps]) for c in CONFIGS}

    rows = reps[0]["results"]["inprocess"]["rows"]
    ratio = {c: summary([r["ratios"][c] for r in reps]) for c in CONFIGS}
    out = {
        "backlog": backlog,
        "rows": rows,
        "rows_per_s": per("rows_per_s"),
        "ratios": ratio,
        "upload_seconds": per("seconds"),
        "client_cpu_seconds": per("cpu_seconds"),
        "server_cpu_seconds": per("server_cpu_seconds"),
        "http_requests": per("http_requests"),
        "http_wait_seconds": per("http_seconds"),
        "tiled_5xx_retries": {c: sum(r["results"][c]["tiled_5xx_retries"] for r in reps) for c in CONFIGS},
        "append_retries": {c: sum(r["results"][c].get("append_retries", 0) for r in reps) for c in CONFIGS},
        "rewrites": {c: sum(r["results"][c].get("rewrites", 0) for r in reps) for c in CONFIGS},
        "retry_sample": retries.sample,
        "tiled_log_database_is_locked": server_log.count("database is locked"),
        "http_by_kind": {c: reps[0]["results"][c]["http"] for c in CONFIGS},
        "parity": {
            "runs_checked": len(uids),
            "problems": parity_problems,
            "green": not parity_problems,
            "variants_problems": variant_problems,
        },
        "profiles": profiles,
        "repetitions": reps,
    }
    sidecar_ratio = ratio["sidecar"]["median"]
    out["headline"] = {
        "sidecar_vs_inprocess": sidecar_ratio,
        "best_variant_vs_inprocess": max(ratio[c]["median"] for c in CONFIGS[1:]),
        "parity_green": not parity_problems,
        "target_met": bool(sidecar_ratio >= 5 and not parity_problems),
    }
    return out


def _profiles(bench: Bench, tiled: Any, root_client: Any, source: Path) -> dict[str, Any]:
    """cProfile of each side uploading the first run of the backlog (untimed)."""
    from tiled.client import from_uri

    one_run = bench.workdir / "profile-source"
    shutil.rmtree(one_run, ignore_errors=True)
    (one_run / "runs").mkdir(parents=True)
    (one_run / "quarantine").mkdir()
    one_run.chmod(0o700)
    first = sorted((source / "runs").iterdir())[0]
    shutil.copytree(first, one_run / "runs" / first.name)
    inclusive = {
        "jsonschema validation (event_model schema_validators)": "jsonschema/validators.py:validate",
        "copy.deepcopy": "copy.py:deepcopy",
        "HTTP requests (httpx Client.send)": "httpx/_client.py:send",
        "documents through normalizer and writer (DocumentRouter)": "event_model/__init__.py:__call__",
        "uploader verification (_verify)": "tiled_writer_sidecar/run_upload.py:_verify",
        "reading the spool (LogReader.read)": "tiled_writer_sidecar/spool/segment.py:read",
        "writing a batch (_RunWriter._write_internal_data)": "bluesky_tiled_plugins/writing/tiled_writer.py:_write_internal_data",
    }
    out = {}
    for config in ("inprocess", "sidecar"):
        container = f"profile-{config}"
        root_client.create_container(container)
        uri = f"{tiled.uri}/api/v1/metadata/{container}"
        path = str(bench.workdir / f"{config}.prof")
        if config == "inprocess":
            client = from_uri(uri, api_key=tiled.api_key)
            result = inprocess_upload(read_documents(one_run), client, profile=path)
            client.context.close()
        else:
            spool = bench.workdir / "profile-sidecar"
            shutil.copytree(one_run, spool)
            result = sidecar_upload(spool, uri, profile=path, api_key=tiled.api_key)
        out[config] = {
            "seconds": result["seconds"],
            "rows": result["rows"],
            **profile_summary(path, inclusive=inclusive),
        }
    return out
