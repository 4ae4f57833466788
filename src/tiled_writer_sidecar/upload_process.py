"""Entry point of the uploader's own OS process (started by the daemon).

The daemon runs the uploader as a child process so TiledWriter's heavy work
(pandas, pyarrow, HTTP) never holds the receiver's GIL and a crash in it
never stops spooling. The effective config arrives as JSON on the command
line (it holds no secret: the API key comes from the environment or
``api_key_file``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType

from . import process_defaults
from .config import config_from_dict
from .errors import SidecarError
from .logs import setup_logging
from .spool.directory import SpoolDir


def main(argv: list[str] | None = None) -> int:
    process_defaults.apply()
    from .uploader import Uploader  # imports tiled: after apply()

    parser = argparse.ArgumentParser(prog="tiled-writer-sidecar-uploader")
    parser.add_argument("--config-json", required=True)
    args = parser.parse_args(argv)
    config = config_from_dict(json.loads(args.config_json))
    setup_logging(config.log.level, config.log.format, role="uploader")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
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
