"""The `tiled-writer-sidecar` command line.

Every subcommand loads the config (``--config`` or the default path), lets
flags override only what was given, and runs. Expected failures
(`errors.SidecarError`) print one line and exit with their code (2 for usage
and config errors); only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from . import process_defaults
from .config import Config, load_config
from .errors import ConfigError, SidecarError
from .logs import setup_logging

PROG = "tiled-writer-sidecar"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def _add_common(parser: argparse.ArgumentParser, *, zmq: bool = False, tiled: bool = False) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default: /etc/tiled-writer-sidecar/tiled-writer-sidecar.toml if present)",
    )
    parser.add_argument("--spool-dir", help="spool directory (overrides [spool] dir)")
    if zmq:
        parser.add_argument("--zmq", help="proxy out-address to subscribe to, e.g. tcp://127.0.0.1:5578")
    if tiled:
        parser.add_argument(
            "--tiled-uri", help="Tiled server URI, e.g. http://127.0.0.1:8000 (API key: TILED_API_KEY)"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Durable out-of-process writer of bluesky documents into Tiled.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="the daemon: subscribe, spool, upload")
    _add_common(p, zmq=True, tiled=True)
    p.add_argument(
        "--check-config", action="store_true", help="validate the config, print it (API key masked) and exit"
    )

    p = sub.add_parser("replay", help="upload what the spool still holds, then exit")
    _add_common(p, tiled=True)
    p.add_argument("uids", nargs="*", metavar="RUN_UID", help="runs to upload (default: all pending)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; change nothing")
    p.add_argument("--watch", action="store_true", help="keep uploading new runs as they appear")
    p.add_argument(
        "--overwrite-foreign",
        action="store_true",
        help="DELETE a run in Tiled that this spool did not create and rewrite it (default: quarantine it)",
    )
    p.add_argument(
        "--give-up-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="exit 1 if Tiled stays unreachable this long (default 60; not with --watch)",
    )

    p = sub.add_parser("import-backup", help="upload TiledWriter JSONL backup files")
    _add_common(p, tiled=True)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument(
        "--overwrite-foreign",
        action="store_true",
        help="DELETE a run in Tiled that this spool did not create and rewrite it (default: quarantine it)",
    )

    p = sub.add_parser("status", help="runs in the spool: state, documents, uploaded, gaps")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="one JSON object with a runs list")

    p = sub.add_parser("verify", help="check every record's framing and CRC")
    _add_common(p)
    p.add_argument("--repair", action="store_true", help="truncate torn tails")

    p = sub.add_parser("monitor", help="live terminal view (a second subscriber)")
    _add_common(p, zmq=True)
    p.add_argument("--sidecar", help="sidecar health URL (default: http://[metrics] address)")
    p.add_argument("--plot", help="data key to plot (default: the first detector key)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    p.add_argument("--seconds", type=float, default=2.0, help="with --once: how long to listen first")

    p = sub.add_parser(
        "proxy", help="drop-in for bluesky-0MQ-proxy that buffers bursts instead of dropping them"
    )
    _add_proxy_arguments(p)

    p = sub.add_parser(
        "demo", help="the whole system on this machine: Tiled, proxy, sidecar, scans, an outage"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser


def _add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """bluesky-0MQ-proxy's flags (same names and meaning), plus the buffer, replay and metrics
    (parsed in `proxy.options_from_args`)."""
    parser.add_argument(
        "--in-address", help="where RunEngines' Publishers connect: PORT, HOST:PORT or tcp://HOST:PORT"
    )
    parser.add_argument("--out-address", help="where subscribers connect (same forms)")
    for side, what in (("in", "input"), ("out", "output")):
        parser.add_argument(
            f"--{side}-mode",
            choices=["bind", "connect"],
            default="bind",
            help=f"{what} socket mode: bind (server, default) or connect (client)",
        )
        parser.add_argument(
            f"--{side}-curve-secret",
            metavar="FILE",
            help=f"CURVE server certificate (secret key) of the {what} socket",
        )
        parser.add_argument(
            f"--{side}-curve-client-keys",
            metavar="DIR",
            help=f"folder of the public certificates admitted on the {what} socket (default: any key)",
        )
        parser.add_argument(
            f"--{side}-curve-allow",
            nargs="*",
            metavar="IP",
            help=f"IP addresses admitted on the {what} socket (with or without CURVE)",
        )
        parser.add_argument(
            f"--{side}-client-secret",
            metavar="FILE",
            help=f"CURVE client certificate of the {what} socket (connect)",
        )
        parser.add_argument(
            f"--{side}-server-public",
            metavar="FILE",
            help=f"public certificate of the server the {what} socket connects to",
        )
    parser.add_argument(
        "--max-buffer-bytes",
        default="256MiB",
        metavar="SIZE",
        help="memory for messages in all, e.g. 268435456, 256MiB, 1GiB (default 256MiB): half the buffer, "
        "a quarter each subscriber's pipe, a quarter the replay ring; past it a full subscriber misses "
        "messages (counted)",
    )
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="a subscriber that reads nothing for this long misses messages instead of holding the others "
        "back (default 5)",
    )
    parser.add_argument(
        "--replay-seconds",
        type=float,
        default=300.0,
        metavar="S",
        help="how long a restarted sidecar's subscription is caught up for (default 300; 0: off)",
    )
    parser.add_argument(
        "--replay-margin",
        type=float,
        default=10.0,
        metavar="S",
        help="the catch-up starts this long before the subscription went away (default 10)",
    )
    parser.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default: off; the systemd unit uses 127.0.0.1:9479)",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="count",
        default=0,
        help="log start and stop documents (-vvv: every message's name and size)",
    )
    parser.add_argument("--logfile", help="write the log to this file instead of stderr")


def effective_config(args: argparse.Namespace) -> Config:
    config = load_config(getattr(args, "config", None))
    return config.with_overrides(
        spool_dir=getattr(args, "spool_dir", None),
        zmq_address=getattr(args, "zmq", None),
        tiled_uri=getattr(args, "tiled_uri", None),
    )


def main(argv: list[str] | None = None) -> int:
    process_defaults.apply()  # before tiled is imported; the uploader child inherits the environment
    console = Console(stderr=True)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(keep=args.keep)
        if args.command == "proxy":  # no config file: the proxy is configured by its flags only
            from .proxy import options_from_args, run_proxy, setup_proxy_logging

            setup_proxy_logging(args)
            return run_proxy(options_from_args(args))
        config = effective_config(args)
        setup_logging(config.log.level, config.log.format, role="receiver" if args.command == "run" else "")
        return _dispatch(args, config, console)
    except SidecarError as err:
        console.print(f"{PROG}: error: {err}", markup=False, highlight=False, soft_wrap=True)
        return err.exit_code
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        console.print(
            f"{PROG}: error: {err.strerror or err}{where}", markup=False, highlight=False, soft_wrap=True
        )
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, config: Config, console: Console) -> int:
    command = args.command
    if command == "run":
        if args.check_config:
            key = config.api_key()
            print(config.to_toml())
            print(f"# API key: {'set (masked)' if key else 'not set'}")
            return 0
        from .daemon import run_daemon

        return run_daemon(config)
    if command == "replay":
        from .replay import replay

        return replay(
            config,
            args.uids,
            dry_run=args.dry_run,
            watch=args.watch,
            console=console,
            give_up_after=args.give_up_after,
            overwrite_foreign=args.overwrite_foreign,
        )
    if command == "import-backup":
        from .replay import import_backup

        return import_backup(config, args.files, console=console, overwrite_foreign=args.overwrite_foreign)
    if command == "status":
        from .spool.directory import SpoolDir
        from .status import print_status, status_report

        report = status_report(SpoolDir(config.spool_dir, create=False))
        print_status(report, args.json, Console())
        return 0
    if command == "verify":
        return _verify(config, args.repair, console)
    if command == "monitor":
        from .monitor import run_monitor

        return run_monitor(config, args)
    raise ConfigError(f"unknown command {command}")


def _verify(config: Config, repair: bool, console: Console) -> int:
    from .spool.check import verify_spool
    from .spool.directory import SpoolDir
    from .text import clean

    reports = verify_spool(SpoolDir(config.spool_dir, create=False), repair=repair)
    bad = 0
    for r in reports:
        problems = [r.problem] if r.problem else [f"{n} corrupt bytes at offset {o}" for o, n in r.corrupt]
        if r.torn_tail:
            problems.append(f"torn tail of {r.torn_tail} bytes" + (" (truncated)" if r.repaired else ""))
        if problems:
            bad += 1
        summary = "; ".join(problems) if problems else None
        print(
            clean(f"{r.run}/{r.segment}: {r.records} records" + (f": {summary}" if summary else ", ok"), 1000)
        )
    records = sum(r.records for r in reports)
    print(f"{len(reports)} segment(s), {records} records, {bad} with problems")
    unrepaired = any(r.corrupt or (r.torn_tail and not r.repaired) for r in reports)
    return 1 if unrepaired else 0


if __name__ == "__main__":
    sys.exit(main())
