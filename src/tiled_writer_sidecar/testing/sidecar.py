"""The real `tiled-writer-sidecar run` daemon as a managed subprocess.

`SidecarProcess` writes a TOML config (spool directory, proxy address,
Tiled URI, metrics on a free port), starts the console script in its own
process group with the API key in its environment, and waits for
``/healthz`` with a deadline. `health()` reads that endpoint; `status()`
runs ``status --json``; `wait_drained()` polls until every run in the spool
is uploaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from tiled_writer_sidecar.testing._process import ManagedProcess, console_script
from tiled_writer_sidecar.testing.ports import LOCALHOST, free_port, wait_until


def sidecar_command() -> list[str]:
    """The `tiled-writer-sidecar` CLI of this interpreter's environment."""
    return console_script("tiled-writer-sidecar", "tiled_writer_sidecar.cli")


class SidecarProcess:
    def __init__(
        self,
        directory: Path,
        *,
        zmq_address: str,
        tiled_uri: str,
        api_key: str | None,
        settings: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.directory = directory
        self.spool_dir = directory / "spool"
        self.metrics_port = free_port()
        self.api_key = api_key
        sections: dict[str, dict[str, Any]] = {
            "zmq": {"address": zmq_address},
            "tiled": {"uri": tiled_uri, "batch_seconds": 0.5, "backoff_max_seconds": 2.0},
            "spool": {"dir": str(self.spool_dir)},
            "metrics": {"address": f"{LOCALHOST}:{self.metrics_port}"},
        }
        for name, values in (settings or {}).items():
            sections.setdefault(name, {}).update(values)
        self.config_path = directory / "sidecar.toml"
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(_to_toml(sections))
        env = dict(os.environ)
        env.pop("TILED_API_KEY", None)
        if api_key:
            env["TILED_API_KEY"] = api_key
        self.env = env
        self.process = ManagedProcess(
            [*sidecar_command(), "run", "--config", str(self.config_path)],
            log_path=directory / "sidecar.log",
            env=env,
        )

    @property
    def health_url(self) -> str:
        return f"http://{LOCALHOST}:{self.metrics_port}/healthz"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCALHOST}:{self.metrics_port}/metrics"

    def start(self, timeout: float = 60.0) -> Self:
        self.process.spawn()
        wait_until(self._answers, timeout, what=f"sidecar health at {self.health_url}")
        return self

    def _alive(self) -> None:
        if not self.process.running:
            raise RuntimeError(f"sidecar exited ({self.process.returncode}):\n{self.process.log_tail()}")

    def _answers(self) -> bool:
        self._alive()
        try:
            return httpx.get(self.health_url, timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def health(self) -> dict[str, Any]:
        response = httpx.get(self.health_url, timeout=10)
        data: dict[str, Any] = response.json()
        return data

    def wait_uploader_connected(self, timeout: float = 90.0) -> None:
        """Poll /healthz until the uploader child reports Tiled as up (it imports slowly)."""

        def connected() -> bool:
            self._alive()
            try:
                return bool(self.health()["tiled"]["state"] == "up")
            except (httpx.HTTPError, KeyError, ValueError):
                return False

        wait_until(connected, timeout, interval=0.2, what="the sidecar's uploader to reach Tiled")

    def messages_seen(self) -> int:
        try:
            return int(self.health()["receiver"]["messages"])
        except (httpx.HTTPError, KeyError, ValueError):
            return 0

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [*sidecar_command(), "status", "--json", "--spool-dir", str(self.spool_dir)],
            capture_output=True,
            text=True,
            check=True,
            env=self.env,
            timeout=60,
        )
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def wait_drained(self, uids: list[str], timeout: float = 120.0) -> dict[str, Any]:
        """Poll `status` until every run in `uids` is uploaded (or incomplete); return it."""
        result: dict[str, Any] = {}

        def drained() -> bool:
            nonlocal result
            self._alive()
            result = self.status()
            states = {r["uid"]: r["state"] for r in result["runs"]}
            return all(states.get(uid) in ("uploaded", "incomplete") for uid in uids)

        wait_until(drained, timeout, interval=0.25, what=f"runs {uids} uploaded")
        return result

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain) and wait; SIGKILL after `timeout`."""
        return self.process.terminate(timeout)

    def kill(self) -> int | None:
        return self.process.kill()

    def kill_uploader(self) -> None:
        """SIGKILL only the uploader child (the receiver must restart it)."""
        pid = self.process.pid
        if pid is None:
            raise RuntimeError("sidecar is not running")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGKILL)

    def log_tail(self, lines: int = 80) -> str:
        return self.process.log_tail(lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.process.terminate(30)


def _to_toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def spool_documents(spool_dir: Path, documents: list[tuple[str, dict[str, Any]]]) -> None:
    """Spool documents through the receiver's own code path (`Ingest`: validation, routing, log), no 0MQ."""
    from tiled_writer_sidecar.config import SpoolConfig
    from tiled_writer_sidecar.receive.counters import ReceiverStats
    from tiled_writer_sidecar.receive.ingest import Ingest
    from tiled_writer_sidecar.spool.directory import SpoolDir

    ingest = Ingest(SpoolConfig(dir=str(spool_dir)), SpoolDir(spool_dir), ReceiverStats())
    for name, doc in documents:
        ingest.accept(name, doc)
    ingest.shutdown()
