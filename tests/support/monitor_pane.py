"""``tiled-writer-sidecar monitor`` live in a tmux pane, its screen read with ``capture-pane``.

tmux runs on a private server socket in the pane's directory, so nothing
else's tmux is touched, and `close()` kills that server. The pane's shell
outlives the monitor (``trap :`` lets Ctrl+C reach only the monitor's exit
path) and prints ``monitor exit status N``; ``remain-on-exit`` keeps the
pane readable after that. ``env -u COLUMNS -u LINES``: a COLUMNS inherited
by the tmux server would pin rich's width to it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Self

import pytest

from tiled_writer_sidecar.testing import wait_until
from tiled_writer_sidecar.testing._process import Service
from tiled_writer_sidecar.testing.sidecar import sidecar_command

SESSION = "mon"


class MonitorPane(Service):
    """``monitor --zmq ZMQ --sidecar URL`` in a `width` x `height` tmux pane; started by ``with``."""

    def __init__(self, directory: Path, *, zmq: str, sidecar: str, width: int, height: int = 45) -> None:
        self.directory = directory
        self.socket = directory / "tmux.sock"
        self.config = directory / "monitor.toml"
        self.monitor_argv = [*sidecar_command(), "monitor", "--config", str(self.config)]
        self.monitor_argv += ["--zmq", zmq, "--sidecar", sidecar]
        self.size = (width, height)

    def tmux(self, *args: str) -> str:
        """Run tmux on the private server; its stdout."""
        done = subprocess.run(
            ["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout

    def start(self) -> Self:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is needed for the live-screen test: apt-get install -y tmux")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text("")
        command = f"trap : INT; env -u COLUMNS -u LINES {shlex.join(self.monitor_argv)}"
        command += '; echo "monitor exit status $?"'
        width, height = self.size
        self.tmux("new-session", "-d", "-s", SESSION, "-x", str(width), "-y", str(height), command,
                  ";", "set-option", "-t", SESSION, "remain-on-exit", "on")  # fmt: skip
        return self

    def screen(self) -> str:
        """What the pane shows now."""
        return self.tmux("capture-pane", "-p", "-t", SESSION)

    def messages_on_screen(self) -> int:
        """The monitor's count of messages received ("N messages"), 0 before it shows one."""
        found = re.search(r"([\d,]+) messages", self.screen())
        return int(found.group(1).replace(",", "")) if found else 0

    def exit_status(self) -> str | None:
        """The monitor's exit status once it has exited, else None."""
        found = re.search(r"monitor exit status (\d+)", self.screen())
        return found.group(1) if found else None

    def interrupt(self, timeout: float = 30) -> str:
        """Ctrl+C; wait until the monitor has exited and return its exit status."""
        self.tmux("send-keys", "-t", SESSION, "C-c")
        status: str = wait_until(self.exit_status, timeout, what="the monitor to exit after Ctrl+C")
        return status

    def close(self) -> None:
        """Kill the private tmux server (and with it the monitor); safe to call again."""
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=30)
