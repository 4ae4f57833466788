"""Entry point of the uploader's own OS process (started by the daemon).

The daemon runs the uploader as a child process so TiledWriter's heavy work
(pandas, pyarrow, HTTP) never holds the receiver's GIL and a crash in it
never stops spooling. The effective config arrives as JSON on standard
input (a pipe from the daemon), never on the command line, which every
local user can read in the process list; it holds no secret either way (the
API key comes from the environment or ``api_key_file``).

It dies with the receiver, however that dies (SIGKILL too): on Linux the
kernel sends it SIGTERM when its parent exits (``PR_SET_PDEATHSIG``), and
it exits at once if the receiver that started it (``RECEIVER_PID_ENV``) is
already gone. An orphan would keep ``uploader.lock`` and leave the next
receiver unable to run an uploader of its own.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
from types import FrameType

from tiled_writer_sidecar.config import config_from_dict
from tiled_writer_sidecar.documents.wire import budget_for
from tiled_writer_sidecar.errors import SidecarError
from tiled_writer_sidecar.logs import setup_logging
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.segment import bound_reads
from tiled_writer_sidecar.upload import process_defaults

#: The receiver's pid, set by the daemon in the uploader's environment.
RECEIVER_PID_ENV = "TILED_WRITER_SIDECAR_RECEIVER_PID"
_PR_SET_PDEATHSIG = 1

#: The kernel's OOM killer picks the uploader before the receiver (which must never stop).
OOM_SCORE_ADJ = 500


def _be_the_oom_victim() -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError:
        pass  # not Linux, or not allowed: the receiver is merely less protected


def _die_with_the_receiver() -> bool:
    """Ask for SIGTERM when the parent exits; False if the receiver that started us is gone already."""
    expected = os.environ.get(RECEIVER_PID_ENV, "")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: systemd's KillMode still stops us with the unit
        pass
    return not expected.isdigit() or os.getppid() == int(expected)


def main(argv: list[str] | None = None) -> int:
    if not _die_with_the_receiver():
        print("tiled-writer-sidecar uploader: the receiver that started it is gone", file=sys.stderr)
        return 1
    process_defaults.apply()
    _be_the_oom_victim()
    parser = argparse.ArgumentParser(
        prog="tiled-writer-sidecar-uploader", description="reads the config as JSON on stdin"
    )
    parser.parse_args(argv)
    try:
        config = config_from_dict(json.loads(sys.stdin.read()), "stdin")
    except (ValueError, AttributeError) as err:
        print(f"tiled-writer-sidecar uploader: no valid config on stdin: {err}", file=sys.stderr)
        return 2
    except SidecarError as err:
        print(f"tiled-writer-sidecar uploader: {err}", file=sys.stderr)
        return err.exit_code
    setup_logging(config.log.level, config.log.format, role="uploader")
    from tiled_writer_sidecar.upload.scheduler import (
        Uploader,
    )  # imports tiled: after apply()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bound_reads(config.spool.segment_bytes, budget_for(config.zmq.max_message_bytes))
    try:
        spool = SpoolDir(config.spool_dir, create=False)
        spool.lock("uploader")
        Uploader(config, spool, stop=stop).run()
    except SidecarError as err:
        print(f"tiled-writer-sidecar uploader: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"tiled-writer-sidecar uploader: {err.strerror or err}: {err.filename or ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
