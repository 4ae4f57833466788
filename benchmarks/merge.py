"""Merge standalone live-streaming runs into results.json and regenerate RESULTS.md.

``python -m benchmarks.merge FILE... [--into benchmarks/results.json]``: the
files are what ``python -m benchmarks.live_streaming`` writes (one long case
at a time, e.g. 10,000 events at 10 Hz); later files replace the same case
and writer of earlier ones. The other comparisons in results.json are kept
as they are, key order included, so the diff shows only this one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import live_streaming, report
from . import run as bench_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+", help="live_streaming result files, oldest first")
    parser.add_argument("--into", type=Path, default=bench_run.HERE / "results.json", help="results.json")
    args = parser.parse_args(argv)
    results = json.loads(args.into.read_text()) if args.into.exists() else {"comparisons": {}}
    results.setdefault("comparisons", {})[live_streaming.NAME] = live_streaming.merged_comparison(args.files)
    tmp = args.into.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(args.into)
    report.write(results, args.into.with_name("RESULTS.md"), [m.NAME for m in bench_run.COMPARISONS])
    print(f"merged {len(args.files)} file(s) into {args.into} and regenerated RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
