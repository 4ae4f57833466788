"""The `tiled-writer-sidecar` command line.

Every subcommand loads the config (``--config`` or the default path), lets
flags override only what was given, and runs. Expected failures
(`errors.SidecarError`) print one line and exit with their code (2 for usage
and config errors); only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path

from rich.console import Console

from tiled_writer_sidecar import __version__
from tiled_writer_sidecar.commands.resources import CONFIGS, UNITS
from tiled_writer_sidecar.commands.status import CHECK_CRIT_AGE_S, CHECK_WARN_AGE_S
from tiled_writer_sidecar.config import LOG_LEVELS, Config, load_config
from tiled_writer_sidecar.errors import ConfigError, SidecarError
from tiled_writer_sidecar.logs import StreamToLog, setup_logging
from tiled_writer_sidecar.upload import process_defaults

PROG = "tiled-writer-sidecar"
log = logging.getLogger(__name__)


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


#: Each subcommand: (name, one-line help for the command list, description for its own --help).
COMMANDS = {
    "run": (
        "the daemon: subscribe, spool, upload",
        "Subscribe to the 0MQ proxy, spool every document durably and upload it to Tiled with "
        "TiledWriter (two processes: receiver and uploader). Serves /metrics and /healthz. "
        "SIGTERM/SIGINT drain gracefully; sd_notify READY/WATCHDOG under systemd.",
    ),
    "replay": (
        "upload what the spool still holds, then exit",
        "Upload the runs left in a spool (all pending ones, or the RUN_UIDs given), then exit; with "
        "--watch keep uploading new runs. Not while a `run` daemon uploads the same spool (lock file).",
    ),
    "import-backup": (
        "upload TiledWriter JSONL backup files",
        "Upload the JSONL backup files in-process TiledWriter leaves after a failure, one run per file.",
    ),
    "status": (
        "runs in the spool: state, documents, uploaded, gaps",
        "Per run: uid, scan_id, plan, state, documents spooled and uploaded, gaps and problems; totals. "
        "Exits 0 whenever the spool could be read. --check instead prints one line for a monitoring "
        "check and exits 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (Nagios plugin convention).",
    ),
    "verify": (
        "check every record's framing and CRC",
        "Read every spool segment and check each record's length, CRC and framing; --repair truncates "
        "torn tails (what a crash mid-write leaves). Exits 1 if something could not be repaired.",
    ),
    "monitor": (
        "live terminal view (a second subscriber)",
        "Subscribe to the proxy like the sidecar does and show live what is being acquired, with the "
        "sidecar's health from its /healthz. Keys: q quits.",
    ),
    "proxy": (
        "drop-in for bluesky-0MQ-proxy that buffers bursts instead of dropping them",
        "Forward messages from RunEngines' Publishers to subscribers like bluesky-0MQ-proxy, but hold a "
        "bounded buffer for a slow subscriber instead of dropping what it cannot take at once.",
    ),
    "demo": (
        "the whole system on this machine: Tiled, proxy, sidecar, scans, an outage",
        "Start a temporary Tiled server, bluesky's proxy and the sidecar on free local ports, run simulated "
        "scans, stop and restart Tiled, and check every row in Tiled. Needs the `demo` extra "
        "(pip install 'tiled-writer-sidecar[demo]').",
    ),
    "print-unit": (
        "print a systemd unit shipped with the package",
        "Print one of the systemd units: sidecar (tiled-writer-sidecar.service), template "
        "(tiled-writer-sidecar@.service, one sidecar per /etc/tiled-writer-sidecar/NAME.toml), proxy "
        "(the buffering proxy) or bluesky-proxy (bluesky-0MQ-proxy). Install with e.g. "
        "`tiled-writer-sidecar print-unit sidecar > /etc/systemd/system/tiled-writer-sidecar.service`.",
    ),
    "print-config": (
        "print the example config, alert rules or dashboard",
        "Print a file shipped with the package: sidecar (the example TOML config, every key with its "
        "default), prometheus (alert rules) or grafana (dashboard JSON).",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Durable out-of-process writer of bluesky documents into Tiled.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str) -> argparse.ArgumentParser:
        summary, description = COMMANDS[name]
        return sub.add_parser(name, help=summary, description=description)

    p = command("run")
    _add_common(p, zmq=True, tiled=True)
    p.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help='serve /metrics and /healthz here (overrides [metrics] address; "" turns it off)',
    )
    p.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, help="log level (overrides [log] level)"
    )
    p.add_argument(
        "--check-config", action="store_true", help="validate the config, print it (API key masked) and exit"
    )

    p = command("replay")
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

    p = command("import-backup")
    _add_common(p, tiled=True)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument(
        "--overwrite-foreign",
        action="store_true",
        help="DELETE a run in Tiled that this spool did not create and rewrite it (default: quarantine it)",
    )

    p = command("status")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="one JSON object with a runs list")
    p.add_argument(
        "--check",
        action="store_true",
        help="one line for a monitoring check; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
    )
    p.add_argument(
        "--warn-age",
        type=float,
        default=CHECK_WARN_AGE_S,
        metavar="SECONDS",
        help=f"with --check: WARNING when a run has waited this long for upload (default {CHECK_WARN_AGE_S:.0f})",
    )
    p.add_argument(
        "--crit-age",
        type=float,
        default=CHECK_CRIT_AGE_S,
        metavar="SECONDS",
        help=f"with --check: CRITICAL when a run has waited this long (default {CHECK_CRIT_AGE_S:.0f})",
    )

    p = command("verify")
    _add_common(p)
    p.add_argument("--repair", action="store_true", help="truncate torn tails")

    p = command("monitor")
    _add_common(p, zmq=True)
    p.add_argument("--sidecar", help="sidecar health URL (default: http://[metrics] address)")
    p.add_argument("--plot", help="data key to plot (default: the first detector key)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    p.add_argument("--seconds", type=float, default=2.0, help="with --once: how long to listen first")

    p = command("proxy")
    _add_proxy_arguments(p)

    p = command("demo")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")

    p = command("print-unit")
    p.add_argument(
        "unit", nargs="?", default="sidecar", choices=list(UNITS), help="which unit (default: sidecar)"
    )

    p = command("print-config")
    p.add_argument(
        "file", nargs="?", default="sidecar", choices=list(CONFIGS), help="which file (default: sidecar)"
    )
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
        "messages (counted). A message is at most a sixteenth of it (16 MiB by default, 64 MiB at most)",
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
        metrics_address=getattr(args, "metrics_address", None),
        log_level=getattr(args, "log_level", None),
    )


def main(argv: list[str] | None = None) -> int:
    process_defaults.apply()  # before tiled is imported; the uploader child inherits the environment
    console = Console(stderr=True)
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("print-unit", "print-config"):
            from tiled_writer_sidecar.commands.resources import config_text, unit_text

            sys.stdout.write(unit_text(args.unit) if args.command == "print-unit" else config_text(args.file))
            return 0
        if args.command == "demo":
            from tiled_writer_sidecar.commands.demo import run_demo

            return run_demo(keep=args.keep)
        if args.command == "proxy":  # no config file: the proxy is configured by its flags only
            from tiled_writer_sidecar.tools.proxy.main import (
                options_from_args,
                run_proxy,
                setup_proxy_logging,
            )

            setup_proxy_logging(args)
            return run_proxy(options_from_args(args))
        if args.command == "status" and args.check:
            return _check(args)
        config = effective_config(args)
        daemon = args.command == "run" and not args.check_config
        setup_logging(config.log.level, config.log.format, role="receiver" if daemon else "")
        if daemon:
            log.info("%s", startup_line())
        return _dispatch(args, config, console)
    except BrokenPipeError:
        # The reader went away (`status | head`): what it read is what it wanted; no traceback,
        # and no second error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SidecarError as err:
        _fail(console, f"{PROG}: error: {err}")
        return err.exit_code
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        _fail(console, f"{PROG}: error: {err.strerror or err}{where}")
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
        from tiled_writer_sidecar.daemon.main import run_daemon

        return run_daemon(config)
    if command == "replay":
        from tiled_writer_sidecar.commands.replay import replay

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
        from tiled_writer_sidecar.commands.replay import import_backup

        return import_backup(config, args.files, console=console, overwrite_foreign=args.overwrite_foreign)
    if command == "status":
        from tiled_writer_sidecar.commands.status import print_status, status_report
        from tiled_writer_sidecar.spool.directory import SpoolDir

        report = status_report(SpoolDir(config.spool_dir, create=False))
        print_status(report, args.json, status_console())
        return 0
    if command == "verify":
        from tiled_writer_sidecar.commands.verify import verify

        return verify(config.spool_dir, repair=args.repair)
    if command == "monitor":
        from tiled_writer_sidecar.tools.monitor.main import run_monitor

        return run_monitor(config, args)
    raise ConfigError(f"unknown command {command}")


def _fail(console: Console, message: str) -> None:
    """The one line of an expected failure: a log record in a daemon (stderr is captured), else printed."""
    if isinstance(sys.stderr, StreamToLog):
        log.error("%s", message)
    else:
        console.print(message, markup=False, highlight=False, soft_wrap=True)


def startup_line() -> str:
    """The daemon's first log line: its version and the versions of what it writes with."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "missing"

    return (
        f"{PROG} {__version__} starting (python {platform.python_version()}, tiled {of('tiled')}, "
        f"bluesky-tiled-plugins {of('bluesky-tiled-plugins')}, bluesky {of('bluesky')}, pyzmq {of('pyzmq')})"
    )


class _StdoutConsole(Console):
    """A closed stdout (`status | head`) ends the command like any closed pipe (see `main`), exit 0."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def status_console() -> Console:
    """stdout; when it is not a terminal, wide enough that no value (a run uid) is ever cut."""
    console = _StdoutConsole()
    return console if console.is_terminal else _StdoutConsole(width=100_000, soft_wrap=True)


def _check(args: argparse.Namespace) -> int:
    """`status --check`: one line on stdout, Nagios exit code; 3 UNKNOWN if the spool cannot be read."""
    from tiled_writer_sidecar.commands.status import UNKNOWN, check_report, status_report
    from tiled_writer_sidecar.spool.directory import SpoolDir

    try:
        config = effective_config(args)
        report = status_report(SpoolDir(config.spool_dir, create=False))
    except (SidecarError, OSError) as err:
        print(f"TILED-WRITER-SIDECAR UNKNOWN - {err}")
        return UNKNOWN
    code, line = check_report(report, warn_age=args.warn_age, crit_age=args.crit_age)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
