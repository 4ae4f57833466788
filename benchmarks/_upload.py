"""Timed uploads: the sidecar's uploader on a spool, or in-process TiledWriter on the same documents.

Used in-process by `backlog_drain` (imports, connecting and reading the
documents happen before the clock starts), and as
``python -m benchmarks._upload MODE --spool DIR --uri URI [--profile FILE]``
for profiling one upload in a fresh interpreter.

- `sidecar_upload`: ``Uploader(config, spool).run(until_idle=True)``, what the
  daemon's uploader child and `replay` run. ``threads=k`` measures an idea
  without touching the package: it splits the runs over k spools each
  drained by its own `Uploader` in its own thread (several runs uploaded
  concurrently).
- `inprocess_upload`: ``TiledWriter(client, batch_size=N)`` called with each
  document in order, as ``RE.subscribe(TiledWriter(client))`` would.
- `HttpTrace`: wall time of every HTTP request by method and endpoint kind,
  to count round-trips and the time spent waiting for Tiled.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Document = tuple[str, dict[str, Any]]


class HttpTrace:
    """Wall time of every HTTP request made through httpx.Client while installed."""

    def __init__(self) -> None:
        self.requests: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[HttpTrace]:
        import httpx

        original = httpx.Client.send
        trace = self

        def send(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(client, request, *args, **kwargs)
            finally:
                parts = request.url.path.split("/")
                kind = parts[3] if len(parts) > 3 and parts[1:3] == ["api", "v1"] else "other"
                with trace._lock:
                    trace.requests.setdefault(f"{request.method} {kind}", []).append(time.perf_counter() - t0)

        httpx.Client.send = send  # type: ignore[method-assign]
        try:
            yield self
        finally:
            httpx.Client.send = original  # type: ignore[method-assign]

    def as_dict(self) -> dict[str, Any]:
        return {
            key: {"count": len(times), "seconds": sum(times)} for key, times in sorted(self.requests.items())
        }

    @property
    def count(self) -> int:
        return sum(len(t) for t in self.requests.values())

    @property
    def seconds(self) -> float:
        return sum(sum(t) for t in self.requests.values())


def read_documents(spool_dir: Path) -> list[Document]:
    """Every document of every run in a spool, runs oldest first."""
    from tiled_writer_sidecar.spool.codec import unpack_document
    from tiled_writer_sidecar.spool.directory import SpoolDir
    from tiled_writer_sidecar.spool.segment import LogReader

    spool = SpoolDir(spool_dir, create=False)
    documents: list[Document] = []
    for view in spool.runs():
        documents += [unpack_document(p) for p in LogReader(view.directory).read()]
    return documents


def split_spool(source: Path, destinations: list[Path]) -> None:
    """Copy the runs of `source` round-robin into len(destinations) new spools."""
    runs = sorted(p for p in (source / "runs").iterdir() if p.is_dir())
    for dest in destinations:
        shutil.rmtree(dest, ignore_errors=True)
        (dest / "runs").mkdir(parents=True)
        (dest / "quarantine").mkdir()
        dest.chmod(0o700)
    for i, run in enumerate(runs):
        shutil.copytree(run, destinations[i % len(destinations)] / "runs" / run.name)


def _cpu() -> float:
    return time.process_time()


def sidecar_upload(
    spool_dir: Path,
    uri: str,
    *,
    batch_rows: int = 10_000,
    batch_seconds: float = 1.0,
    runs_in_flight: int = 1,
    close_streams: str = "always",
    threads: int = 1,
    profile: str | None = None,
    api_key: str | None = None,
    around: contextlib.AbstractContextManager[Any] | None = None,
) -> dict[str, Any]:
    """Drain `spool_dir` into `uri` with the sidecar's Uploader; timings and counts.

    The API key goes where the sidecar reads it from: ``TILED_API_KEY``.
    `around` (a profiler, counters) is entered just around the timed upload.
    """
    if api_key is not None:
        os.environ["TILED_API_KEY"] = api_key
    from tiled_writer_sidecar.config import Config, SpoolConfig, TiledConfig
    from tiled_writer_sidecar.spool.directory import SpoolDir
    from tiled_writer_sidecar.upload.scheduler import Uploader

    if threads > 1:
        parts = [spool_dir.with_name(f"{spool_dir.name}.part{i}") for i in range(threads)]
        split_spool(spool_dir, parts)
    else:
        parts = [spool_dir]
    uploaders = []
    for part in parts:
        config = Config(
            tiled=TiledConfig(
                uri=uri,
                batch_rows=batch_rows,
                batch_seconds=batch_seconds,
                runs_in_flight=runs_in_flight,
                close_streams=close_streams,
            ),
            spool=SpoolConfig(dir=str(part)),
        )
        spool = SpoolDir(part, create=False)
        spool.lock("uploader")
        uploaders.append((spool, Uploader(config, spool, give_up_after=60.0)))
    trace = HttpTrace()
    errors: list[BaseException] = []

    def drain(up: Any) -> None:
        try:
            up.run(until_idle=True)
        except BaseException as err:  # noqa: BLE001 - reported to the caller
            errors.append(err)

    profiler = cProfile.Profile() if profile else None
    try:
        with trace.installed(), around or contextlib.nullcontext():
            cpu0, t0 = _cpu(), time.perf_counter()
            if profiler:
                profiler.enable()
            if threads == 1:
                drain(uploaders[0][1])
            else:
                workers = [threading.Thread(target=drain, args=(up,)) for _, up in uploaders]
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
            if profiler:
                profiler.disable()
            seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    finally:
        for spool, _ in uploaders:
            spool.unlock()
    if profiler and profile:
        profiler.dump_stats(profile)
    if errors:
        raise errors[0]
    states = [v.uploaded.state for spool, _ in uploaders for v in spool.runs()]
    status = [up.status for _, up in uploaders]
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rows": sum(s.rows for s in status),
        "documents": sum(s.documents for s in status),
        "runs_uploaded": sum(s.runs_uploaded for s in status),
        "flushes": sum(s.flushes for s in status),
        "rewrites": sum(s.rewrites for s in status),
        "retries": sum(s.retries for s in status),
        "append_retries": sum(s.append_retries for s in status),
        "all_uploaded": all(state == "uploaded" for state in states),
        "http_requests": trace.count,
        "http_seconds": trace.seconds,
        "http": trace.as_dict(),
    }


def inprocess_upload(
    documents: list[Document],
    client: Any,
    *,
    batch_size: int = 10_000,
    profile: str | None = None,
    around: contextlib.AbstractContextManager[Any] | None = None,
) -> dict[str, Any]:
    """Feed `documents` to ``TiledWriter(client, batch_size=...)``; timings and counts.

    `around` (a profiler, counters) is entered just around the timed upload.
    """
    from bluesky_tiled_plugins import TiledWriter

    writer = TiledWriter(client, batch_size=batch_size)
    rows = sum(1 for name, _ in documents if name == "event")
    trace = HttpTrace()
    profiler = cProfile.Profile() if profile else None
    with trace.installed(), around or contextlib.nullcontext():
        cpu0, t0 = _cpu(), time.perf_counter()
        if profiler:
            profiler.enable()
        for name, doc in documents:
            writer(name, doc)
        if profiler:
            profiler.disable()
        seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    if profiler and profile:
        profiler.dump_stats(profile)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rows": rows,
        "documents": len(documents),
        "http_requests": trace.count,
        "http_seconds": trace.seconds,
        "http": trace.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks._upload")
    parser.add_argument("mode", choices=("sidecar", "inprocess"))
    parser.add_argument("--spool", required=True, type=Path)
    parser.add_argument("--uri", required=True, help="Tiled URI (may be a container's metadata URI)")
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    if args.mode == "sidecar":
        result = sidecar_upload(
            args.spool,
            args.uri,
            batch_rows=args.batch_rows,
            threads=args.threads,
            profile=args.profile,
        )
    else:
        from tiled.client import from_uri

        documents = read_documents(args.spool)
        client = from_uri(args.uri, api_key=os.environ.get("TILED_API_KEY"))
        result = inprocess_upload(documents, client, batch_size=args.batch_rows, profile=args.profile)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
