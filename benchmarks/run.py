"""Run the comparisons: ``python -m benchmarks.run [--smoke] [--only NAME] [--reps N]``.

Every comparison runs its configurations side by side in each repetition
(at least 5, median and spread reported) and records ratios measured in
the same run. Results go to ``benchmarks/results.json`` and a readable
``benchmarks/RESULTS.md`` with plots (``benchmarks/*.png``); with
``--results PATH`` they go next to PATH instead. ``--smoke`` runs every
comparison once with tiny sizes (for CI: it checks the benchmarks still run,
not how fast) and, unless ``--results`` says otherwise, writes into a
temporary directory so it never overwrites the real results. ``--only``
(repeatable) runs some comparisons and keeps the others' earlier results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from . import (
    backlog_drain,
    backlog_live,
    burst,
    live_latency,
    live_streaming,
    memory,
    receive_path,
    replay,
    report,
    runengine_cost,
    scale_out,
    small_runs,
)
from .common import Bench, loadavg, machine, rounded

COMPARISONS: list[ModuleType] = [
    runengine_cost,
    receive_path,
    backlog_drain,
    live_latency,
    memory,
    replay,
    burst,
    scale_out,
    live_streaming,
    small_runs,
    backlog_live,
]
HERE = Path(__file__).resolve().parent


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, shared: dict[str, Any] | None = None) -> int:
    """`shared` goes into ``Bench.shared`` (a comparison's own options, from its standalone command)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one repetition, tiny sizes (CI)")
    parser.add_argument(
        "--only", action="append", choices=[m.NAME for m in COMPARISONS], help="run only this comparison"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 5; 1 with --smoke)")
    parser.add_argument("--results", type=Path, help="results JSON path (default benchmarks/results.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, spools)")
    args = parser.parse_args(argv)

    if args.results is None:
        if args.smoke:
            args.results = Path(tempfile.gettempdir()) / "tiled-writer-sidecar-bench-smoke" / "results.json"
        else:
            args.results = HERE / "results.json"
    args.results.parent.mkdir(parents=True, exist_ok=True)
    reps = args.reps or (1 if args.smoke else 5)
    selected = [m for m in COMPARISONS if not args.only or m.NAME in args.only]
    if args.smoke and receive_path in selected:
        # Smoke only: the receive path needs no Tiled, so it runs while Tiled starts (10-60 s).
        selected.remove(receive_path)
        selected.insert(0, receive_path)

    results: dict[str, Any] = {"comparisons": {}}
    if args.only and args.results.exists():
        results = json.loads(args.results.read_text())
        results.setdefault("comparisons", {})
    results["machine"] = machine()
    results["run"] = {
        "smoke": args.smoke,
        "reps": reps,
        "only": args.only,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so every process started is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(tempfile.mkdtemp(prefix="tws-bench-"))
    bench = Bench(workdir=workdir, smoke=args.smoke, reps=reps, log=_log)
    bench.shared.update(shared or {})
    _log(f"benchmarks: {', '.join(m.NAME for m in selected)}; {reps} repetition(s); work dir {workdir}")
    started = time.monotonic()
    failed = []
    try:
        # Spawn every process the selected comparisons need now: they start concurrently.
        if args.smoke or not all(getattr(m, "OWN_TILED", False) for m in selected):  # smoke: one for all
            bench.tiled(wait=False)
        for module in selected:
            if hasattr(module, "prepare"):
                try:
                    module.prepare(bench)
                except Exception:  # noqa: BLE001 - the comparison itself will fail and say why
                    _log(f"{module.NAME}: prepare failed:\n{traceback.format_exc()}")
        for module in selected:
            _log(f"{module.NAME}: {module.TITLE}")
            t0 = time.monotonic()
            load0 = loadavg()
            entry: dict[str, Any] = {"title": module.TITLE, "target": module.TARGET}
            try:
                entry.update(module.run(bench))
                entry["status"] = "ok"
            except Exception as err:  # noqa: BLE001 - recorded, the other comparisons still run
                entry["status"] = "failed"
                entry["error"] = f"{type(err).__name__}: {err}"
                entry["traceback"] = traceback.format_exc()
                failed.append(module.NAME)
                _log(f"{module.NAME} FAILED: {entry['error']}")
            entry["seconds"] = time.monotonic() - t0
            entry["loadavg"] = {"before": load0, "after": loadavg()}
            entry["smoke"] = args.smoke
            results["comparisons"][module.NAME] = entry
            _log(f"{module.NAME}: done in {entry['seconds']:.0f} s")
            _write(args.results, results)
    finally:
        bench.close()
        results["run"]["seconds"] = time.monotonic() - started
        results["machine"]["loadavg_at_end"] = loadavg()
        _write(args.results, results)
        report_path = args.results.with_name("RESULTS.md")
        try:
            report.write(results, report_path, [m.NAME for m in COMPARISONS])
            _log(f"wrote {args.results} and {report_path}")
        except Exception:  # noqa: BLE001
            _log("report failed:\n" + traceback.format_exc())
            failed.append("report")
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _log(f"total {time.monotonic() - started:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _write(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rounded(results), indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
