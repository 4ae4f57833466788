"""A real Tiled server in a subprocess, with all of its state in one directory.

`tiled serve catalog DIR/catalog.db --init --write DIR/data
--write sqlite:///DIR/tables.db` keeps the catalog (nodes, metadata) in
one SQLite file, appendable tables (TiledWriter's `internal` tables) in a
second SQLite file, and arrays in `DIR/data`. SQLite, not the DuckDB file
that `--temp` uses: DuckDB-backed tables answered 500s, duplicated rows and
crashed when read while being written. Because everything lives in DIR,
`restart()` (same port, same DIR) finds every run written before, and
`kill()` then `start()` is a crash-recovery test. The server binds
127.0.0.1 on a port chosen at run time; readiness is `GET /api/v1/`
polled until 200 with a deadline (plus one authenticated request, so
another server on the port cannot pass for ours); its log is
`DIR/server.log`. Clients made by `client()` are closed by `close()`.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Self

import httpx

from ._process import ManagedProcess, Service
from .ports import LOCALHOST, free_port, wait_until

#: How long a cold start may take (tiled imports dask, pandas, numba, ...:
#: 8-16 s measured on a 2-core machine).
DEFAULT_STARTUP_TIMEOUT = 120.0


def tiled_command() -> list[str]:
    """The `tiled` CLI of this interpreter's environment."""
    executable = Path(sys.executable).parent / "tiled"
    if executable.exists():
        return [str(executable)]
    found = shutil.which("tiled")
    if found is not None and Path(found).parent == Path(sys.executable).parent:
        return [found]
    return [sys.executable, "-m", "tiled"]


class TiledServer(Service):
    """A Tiled server process serving a writable catalog in `directory`."""

    def __init__(
        self,
        directory: Path | str,
        *,
        port: int | None = None,
        api_key: str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        self._directory = Path(directory).resolve()
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._api_key = api_key if api_key is not None else secrets.token_hex(16)
        self.startup_timeout = startup_timeout
        #: Seconds from spawn to the first 200 of `GET /api/v1/`, one per start.
        self.startup_times: list[float] = []
        self._process: ManagedProcess | None = None
        self._spawned_at = 0.0
        self._clients: list[Any] = []

    # -- where things are -------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def port(self) -> int:
        return self._port

    @property
    def api_key(self) -> str:
        return self._api_key

    @property
    def uri(self) -> str:
        return f"http://{LOCALHOST}:{self._port}"

    @property
    def catalog_path(self) -> Path:
        """SQLite catalog database (nodes, metadata, data sources)."""
        return self._directory / "catalog.db"

    @property
    def tables_path(self) -> Path:
        """SQLite database that holds the appendable tables' rows."""
        return self._directory / "tables.db"

    @property
    def data_path(self) -> Path:
        """Directory for file-backed data (zarr arrays)."""
        return self._directory / "data"

    @property
    def log_path(self) -> Path:
        return self._directory / "server.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        """The exact argv used to start the server."""
        return [
            *tiled_command(),
            "serve",
            "catalog",
            str(self.catalog_path),
            "--init",
            "--write",
            str(self.data_path),
            "--write",
            f"sqlite:///{self.tables_path}",
            "--api-key",
            self._api_key,
            "--host",
            LOCALHOST,
            "--port",
            str(self._port),
        ]

    # -- lifecycle --------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float | None = None) -> Self:
        """Spawn the server and (by default) wait until it answers.

        A port picked by `free_port` can be taken by someone else before the
        server binds it; then, on the very first start only, another port is
        tried. On a restart the port is kept (clients hold the URI).
        """
        attempts = 1 if (self._port_fixed or self.startup_times) else 3
        for attempt in range(attempts):
            self._spawn()
            if not wait:
                return self
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                if attempt + 1 < attempts and "address already in use" in (self.log_tail(20).lower()):
                    self._port = free_port()
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self.data_path.mkdir(parents=True, exist_ok=True)
        self._process = ManagedProcess(self.command(), log_path=self.log_path, cwd=self._directory)
        self._process.spawn()
        self._spawned_at = time.monotonic()

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll until the server answers; return seconds since spawn.

        Ready means `GET /api/v1/` is 200 and so is `GET /api/v1/metadata/`
        with our API key: a 200 from some other server that holds the port
        does not count.

        Raises:
            RuntimeError: the process exited (its log tail is in the message).
            TimeoutError: not ready before the deadline.
        """
        process = self._require_process()
        url = f"{self.uri}/api/v1/"
        headers = {"Authorization": f"Apikey {self._api_key}"}

        def ready() -> bool:
            if not process.running:
                raise RuntimeError(
                    f"tiled server exited with {process.returncode} during start-up;"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                return (
                    httpx.get(url, timeout=2.0).status_code == 200
                    and httpx.get(f"{url}metadata/", headers=headers, timeout=2.0).status_code == 200
                )
            except httpx.HTTPError:
                return False

        wait_until(
            ready,
            timeout if timeout is not None else self.startup_timeout,
            interval=0.1,
            what=f"tiled server at {url} (log {self.log_path})",
        )
        elapsed = time.monotonic() - self._spawned_at
        self.startup_times.append(elapsed)
        return elapsed

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after `timeout` s; return exit status."""
        if self._process is None:
            return None
        return self._process.terminate(timeout)

    def kill(self) -> int | None:
        """SIGKILL the server at once, as a crash would."""
        if self._process is None:
            return None
        return self._process.kill()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered."""
        self._require_process().pause()

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        self._require_process().resume()

    def restart(self, *, timeout: float | None = None) -> Self:
        """Stop and start again on the same port and directory."""
        self.stop()
        return self.start(timeout=timeout)

    def close(self) -> None:
        """Close clients, stop the server if it runs; safe to call again."""
        self.close_clients()
        if self.running:
            self.stop()
        elif self._process is not None:
            self._process.kill()  # reap, drop from the leftovers registry

    # -- use --------------------------------------------------------------

    def client(self, **kwargs: Any) -> Any:
        """A fresh `tiled.client.from_uri(uri, api_key=...)` client.

        Its HTTP connections are closed by `close()` (or `close_clients()`).
        """
        from tiled.client import from_uri

        client = from_uri(self.uri, api_key=self._api_key, **kwargs)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        """Close the HTTP connections of every client made by `client()`."""
        clients, self._clients = self._clients, []
        for client in clients:
            client.context.close()

    def log_tail(self, lines: int = 60) -> str:
        """The end of `server.log`, for failure reports."""
        if self._process is None:
            return ""
        return self._process.log_tail(lines)

    def _require_process(self) -> ManagedProcess:
        if self._process is None:
            raise RuntimeError("tiled server was never started")
        return self._process

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"TiledServer({self.uri}, {self._directory}, {state})"


class TiledContainer:
    """A container of its own in the shared Tiled server: where one test's sidecar writes.

    `uri` points the sidecar at the container; `client()` reads it back with
    runs as its children, exactly like a server root.
    """

    def __init__(self, server: TiledServer, name: str) -> None:
        self.server = server
        self.name = name
        self.api_key = server.api_key
        self.uri = f"{server.uri}/api/v1/metadata/{name}"
        self.log_path = server.log_path
        server.client().create_container(name)

    def client(self) -> Any:
        return self.server.client()[self.name]

    def log_tail(self, lines: int = 60) -> str:
        return self.server.log_tail(lines)
