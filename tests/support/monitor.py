"""`tiled-writer-sidecar monitor` as a real process, its output in files (tests of the monitor and of the proxy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from tiled_writer_sidecar.testing import wait_until
from tiled_writer_sidecar.testing.sidecar import sidecar_command


class MonitorProcess:
    """`tiled-writer-sidecar monitor ARGS` with stdout and stderr in files."""

    def __init__(self, directory: Path, *args: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "monitor.toml"
        config.write_text('[log]\nlevel = "INFO"\n')
        self.stdout_path = directory / "monitor.out"
        self.stderr_path = directory / "monitor.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [*sidecar_command(), "monitor", "--config", str(config), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"monitor exited ({self.popen.returncode}):\n{self.log()}")
            return self.log().count(text) >= count

        wait_until(seen, timeout, what=f"{text!r} x{count} in the monitor's log")

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        """SIGINT (ends `--once` early), wait; return (exit code, stdout, stderr)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        code = self.popen.wait(timeout)
        return code, self.stdout_path.read_text(), self.log()

    def snapshot(self, timeout: float = 30.0) -> dict[str, Any]:
        code, out, err = self.finish(timeout)
        assert code == 0, err
        assert "Traceback" not in err
        data: dict[str, Any] = json.loads(out)
        return data

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
