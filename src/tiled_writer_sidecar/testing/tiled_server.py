"""A real Tiled server in a subprocess, with all of its state in one directory.

`tiled serve catalog sqlite:///DIR/catalog.db --init --write DIR/data
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

With ``streaming_cache`` ("memory" or a ``redis://`` URI) the same catalog
(`catalog_uri`, `tables_uri`: a subclass that changes them changes both) is
served from a config file, `DIR/config.yml`, with a ``streaming_cache:``
section, so Tiled streams writes to WebSocket subscribers (``tiled serve
catalog --cache`` fails in tiled 0.2.20 without ``--temp``). `RedisServer`
is Debian's ``redis-server`` on a free port, all state in one directory.

With ``workers`` > 1 the same catalog is served the way facilities scale
Tiled out: ``uvicorn --factory tiled.server.app:app_factory --workers N``
(one process group: the supervisor and its N worker processes, so `stop()`
and `kill()` reach them all), with ``TILED_CONFIG=DIR/config.yml`` holding the
API key (``authentication: single_user_api_key``, what ``tiled serve config
--scalable`` requires) and the catalog; the workers log as ``tiled serve``
does (``DIR/logging.json``, Tiled's own logging configuration). The catalog is
initialised once (``tiled catalog init --if-not-exists``, `init_catalog`)
before the workers start, and the workers do not initialise it (N workers
would race creating its tables). Ready means every worker has started (its
``Application startup complete.`` in the log) and the server answers. A
``"memory"`` streaming cache is refused (each worker would stream only its
own writes); a ``redis://`` one is shared and fine.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import httpx

from tiled_writer_sidecar.testing._process import LocalServer, console_script
from tiled_writer_sidecar.testing.ports import LOCALHOST

#: How long a cold start may take (tiled imports dask, pandas, numba, ...:
#: 8-16 s measured on an idle 2-core machine, over 120 s on one with a load
#: average of 12).
DEFAULT_STARTUP_TIMEOUT = 240.0


class TiledServer(LocalServer):
    """A Tiled server process serving a writable catalog in `directory`."""

    name = "tiled server"

    def __init__(
        self,
        directory: Path | str,
        *,
        port: int | None = None,
        api_key: str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        streaming_cache: str | None = None,
        workers: int = 1,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout)
        self._directory = Path(directory).resolve()
        #: None (no streaming), "memory", or a redis:// URI.
        self.streaming_cache = streaming_cache
        #: Server processes: 1 is ``tiled serve``; more is uvicorn's ``--workers`` on `app_factory`.
        self.workers = workers
        self._check_workers()
        self._catalog_initialised = False
        self._log_offset = 0
        self._api_key = api_key if api_key is not None else secrets.token_hex(16)
        self._clients: list[Any] = []

    # -- where things are -------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory

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
    def catalog_uri(self) -> str:
        """The catalog database: ``sqlite:///DIR/catalog.db``."""
        return f"sqlite:///{self.catalog_path}"

    @property
    def tables_uri(self) -> str:
        """The appendable tables' storage: ``sqlite:///DIR/tables.db``."""
        return f"sqlite:///{self.tables_path}"

    @property
    def config_path(self) -> Path:
        """Tiled's config file, written at each start when `streaming_cache` is set or `workers` > 1."""
        return self._directory / "config.yml"

    @property
    def logging_config_path(self) -> Path:
        """The workers' logging configuration (Tiled's own), written at each start when `workers` > 1."""
        return self._directory / "logging.json"

    @property
    def _uses_config(self) -> bool:
        return self.streaming_cache is not None or self.workers > 1

    def _check_workers(self) -> None:
        """The one rule on `workers`: at least one, and no per-process ("memory") streaming cache with more."""
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.workers > 1 and self.streaming_cache == "memory":
            raise ValueError(
                f'streaming_cache="memory" with {self.workers} workers: each worker would stream only its '
                "own writes; use a redis:// streaming cache"
            )

    def config_text(self) -> str:
        """The `tiled serve config` file: this catalog, plus the streaming cache and (workers > 1) API key.

        With several workers the catalog is initialised once beforehand (`init_catalog`), not by each.
        """
        catalog = {
            "uri": self.catalog_uri,
            "init_if_not_exists": self.workers == 1,
            "writable_storage": [str(self.data_path), self.tables_uri],
        }
        config: dict[str, Any] = {"catalog": catalog}
        if self.streaming_cache is not None:
            config["streaming_cache"] = {"uri": self.streaming_cache}
        if self.workers > 1:
            config["authentication"] = {"single_user_api_key": self._api_key}
        # JSON is YAML: no YAML writer needed, and paths are quoted.
        return json.dumps(config, indent=2)

    def command(self) -> list[str]:
        """The exact argv used to start the server: one launcher, with or without a config file.

        Without a streaming cache, ``tiled serve catalog CATALOG --init --write
        DATA --write TABLES``; with one, ``tiled serve config DIR/config.yml``,
        whose catalog section says the same (`config_text`). Either way on our
        API key, host and port. With `workers` > 1, ``env TILED_CONFIG=DIR/config.yml
        uvicorn --factory tiled.server.app:app_factory --workers N`` on our host
        and port (the API key is in the config file).
        """
        self._check_workers()
        if self.workers > 1:
            return [
                "env",
                f"TILED_CONFIG={self.config_path}",
                *console_script("uvicorn"),
                "--factory",
                "tiled.server.app:app_factory",
                "--workers",
                str(self.workers),
                "--log-config",
                str(self.logging_config_path),
                "--host",
                LOCALHOST,
                "--port",
                str(self._port),
            ]
        if self.streaming_cache is not None:
            source = ["config", str(self.config_path)]
        else:
            source = ["catalog", self.catalog_uri, "--init", "--write", str(self.data_path)]
            source += ["--write", self.tables_uri]
        return [
            *console_script("tiled"),
            "serve",
            *source,
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

        On the very first start a port taken before the server bound it is
        replaced by another free one (`LocalServer`); a restart keeps it.
        """
        self._start_process(wait=wait, timeout=timeout)
        return self

    def init_catalog(self) -> None:
        """``tiled catalog init --if-not-exists CATALOG`` (log ``DIR/catalog-init.log``), once per instance.

        Raises:
            RuntimeError: it failed (the log names why).
        """
        if self._catalog_initialised:
            return
        self._directory.mkdir(parents=True, exist_ok=True)
        argv = [*console_script("tiled"), "catalog", "init", "--if-not-exists", self.catalog_uri]
        log_path = self._directory / "catalog-init.log"
        with log_path.open("ab") as log:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=self.startup_timeout,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(f"tiled catalog init failed ({result.returncode}); log {log_path}")
        self._catalog_initialised = True

    def _spawn(self, cwd: Path | None = None) -> None:
        self.data_path.mkdir(parents=True, exist_ok=True)
        if self._uses_config:
            self.config_path.write_text(self.config_text())
            self.config_path.chmod(0o600)  # it may hold the API key
        if self.workers > 1:
            from tiled.server.logging_config import LOGGING_CONFIG

            self.init_catalog()
            self.logging_config_path.write_text(json.dumps(LOGGING_CONFIG, indent=2))
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
        super()._spawn(cwd or self._directory)

    def _workers_started(self) -> bool:
        """Every worker logged ``Application startup complete.`` since this start (always, with one)."""
        if self.workers == 1:
            return True
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().count(b"Application startup complete.") >= self.workers

    def _answers(self) -> bool:
        """`GET /api/v1/` is 200 and so is `GET /api/v1/metadata/` with our API key: a 200 from
        some other server that holds the port does not count. With several workers, each has started."""
        if not self._workers_started():
            return False
        url = f"{self.uri}/api/v1/"
        headers = {"Authorization": f"Apikey {self._api_key}"}
        try:
            public = httpx.get(url, timeout=2.0).status_code
            return (
                public == 200
                and httpx.get(f"{url}metadata/", headers=headers, timeout=2.0).status_code == 200
            )
        except httpx.HTTPError:
            return False

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


def redis_server_command() -> str | None:
    """Debian's ``redis-server`` (package redis-server), or None if not installed."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


class RedisServer(LocalServer):
    """``redis-server`` on 127.0.0.1 and a free port, no persistence, its log in `directory`.

    Ready means it answers ``PING`` (polled with a deadline).
    """

    name = "redis-server"

    def __init__(self, directory: Path | str, *, startup_timeout: float = 30.0) -> None:
        super().__init__(port=None, startup_timeout=startup_timeout)
        self._directory = Path(directory).resolve()

    @property
    def uri(self) -> str:
        return f"redis://{LOCALHOST}:{self._port}"

    @property
    def log_path(self) -> Path:
        return self._directory / "redis.log"

    def command(self) -> list[str]:
        executable = redis_server_command()
        if executable is None:
            raise RuntimeError("redis-server is not installed (scripts/system-deps.sh installs it)")
        return [
            executable,
            "--bind",
            LOCALHOST,
            "--port",
            str(self._port),
            "--dir",
            str(self._directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ]

    def start(self) -> Self:
        self._directory.mkdir(parents=True, exist_ok=True)
        self._start_process()
        return self

    def _spawn(self, cwd: Path | None = None) -> None:
        super()._spawn(cwd or self._directory)

    def _answers(self) -> bool:
        import socket

        try:
            with socket.create_connection((LOCALHOST, self._port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def close(self) -> None:
        if self._process is not None:
            self._process.terminate(5.0)


class LiveSubscriber:
    """bluesky-tiled-plugins' `subscribe_to_streams` on a container, recording every row it delivers.

    Per run and stream it keeps each delivered row (``seq_num``, event
    ``time``, arrival time) and each update's Tiled sequence number (per
    node, from 1), and which nodes Tiled closed (``stream_closed``).
    `problems()` names every gap or duplicate, in Tiled's sequence numbers
    and in rows. `on_rows(run_uid, stream, frame)` is called per update.

    What a careful consumer does, and this one does:

    - **A run created again is a rewrite** (the sidecar deleted a partial
      upload and writes it again): Tiled announces the same run uid a second
      time. Everything held for that run is dropped (`rewrites` counts it),
      the subscriptions to its old nodes are let go (Tiled's delete closes
      nothing), and the new nodes are followed from their first row.
    - **A gap is filled over HTTP**: a row whose ``seq_num`` is not the next
      one, or a Tiled sequence number that went backwards (Tiled restarted
      and its in-memory streaming cache started again at 1), means updates
      were missed; the table is read over HTTP and merged (`resyncs`).
      Rows are kept once per ``seq_num``; a row delivered again (an append
      Tiled streamed but did not store, retried by the sidecar) is counted
      in `redelivered`.

    Works around bluesky-tiled-plugins 2.0.12 calling its own
    ``_handle_subscription_closed`` with one argument too many (the closed
    subscription was never let go).
    """

    def __init__(
        self,
        container: Any,
        streams: dict[str, tuple[str, ...] | None] | None = None,
        on_rows: Any = None,
    ) -> None:
        import threading

        from bluesky_tiled_plugins.streaming import BlueskyStreamSubscription, _normalize_streams

        self._lock = threading.Lock()
        self.container = container
        self.on_rows = on_rows
        #: (run_uid, stream) -> seq_num -> (event time, arrival time), first delivery
        self.rows: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
        #: (run_uid, stream) -> Tiled sequence numbers of the table node, in arrival order
        self.sequences: dict[tuple[str, str], list[int]] = {}
        #: run uid -> times Tiled announced it again after the first (rewrites)
        self.rewrites: dict[str, int] = {}
        #: (run_uid, stream) -> rows delivered live a second time, and HTTP catch-ups
        self.redelivered: dict[tuple[str, str], int] = {}
        self.resyncs: dict[tuple[str, str], int] = {}
        #: URIs of nodes whose stream Tiled closed
        self.closed: list[str] = []
        self._known_runs: set[str] = set()
        recorder = self

        class _Recording(BlueskyStreamSubscription):  # type: ignore[misc]
            def _handle_container_child(self, update: Any) -> None:
                if recorder._run_announced(update.key):
                    self._let_go(update.key)
                super()._handle_container_child(update)

            def _let_go(self, run_uid: str) -> None:
                with self._lock:
                    stale = [uri for uri in self._subscriptions if f"/{run_uid}" in uri]
                    subscriptions = [self._subscriptions.pop(uri)[0] for uri in stale]
                    for uri in stale:
                        self._ordered_subscription_uris.remove(uri)
                for subscription in subscriptions:
                    subscription._disconnect(wait=False)  # not join: this may be its own thread

            def _handle_subscription_closed(self, uri: str, subscription: Any, *_: Any) -> None:
                with recorder._lock:
                    recorder.closed.append(uri)
                super()._handle_subscription_closed(uri, subscription)

        self.subscription = _Recording(
            container,
            _normalize_streams(streams or {"primary": None}),
            self._on_update,
            start=0,
            max_size=10_000_000,
            run_filter=None,
        )

    def _run_announced(self, run_uid: str) -> bool:
        """Note that Tiled announced `run_uid`; True (and forget its rows) if it did before."""
        with self._lock:
            if run_uid not in self._known_runs:
                self._known_runs.add(run_uid)
                return False
            self.rewrites[run_uid] = self.rewrites.get(run_uid, 0) + 1
            for key in [k for k in self.rows if k[0] == run_uid]:
                self.rows.pop(key)
                self.sequences.pop(key, None)
            return True

    def _on_update(self, update: Any) -> None:
        arrived = time.time()
        frame = update.update.data()  # the whole table update, seq_num and time included
        rows = [(int(s), float(t)) for s, t in zip(frame["seq_num"], frame["time"], strict=True)]
        key = (update.run_uid, update.stream_name)
        with self._lock:
            held = self.rows.setdefault(key, {})
            sequences = self.sequences.setdefault(key, [])
            missed = bool(rows) and rows[0][0] != max(held, default=0) + 1
            missed |= bool(sequences) and update.sequence <= sequences[-1]
            sequences.append(int(update.sequence))
            for seq_num, t in rows:
                if seq_num in held:
                    self.redelivered[key] = self.redelivered.get(key, 0) + 1
                else:
                    held[seq_num] = (t, arrived)
        if missed:
            self._resync(key)
        if self.on_rows is not None:
            self.on_rows(update.run_uid, update.stream_name, frame)

    def _resync(self, key: tuple[str, str]) -> None:
        """Read the table over HTTP and add the rows missed live."""
        from tiled_writer_sidecar.testing.tiled_readback import read_stream

        frame = read_stream(self.container, key[0], key[1], arrays=False)
        arrived = time.time()
        with self._lock:
            self.resyncs[key] = self.resyncs.get(key, 0) + 1
            held = self.rows.setdefault(key, {})
            for s, t in zip(frame["seq_num"], frame["time"], strict=True):
                held.setdefault(int(s), (float(t), arrived))

    def seq_nums(self, run_uid: str, stream: str = "primary") -> list[int]:
        """The rows held for a stream, by seq_num, sorted."""
        with self._lock:
            return sorted(self.rows.get((run_uid, stream), {}))

    def lags(self, run_uid: str, stream: str = "primary") -> list[float]:
        """Seconds from each row's event time to its first arrival at the subscriber."""
        with self._lock:
            return [arrived - t for t, arrived in self.rows.get((run_uid, stream), {}).values()]

    def arrivals(self, run_uid: str, stream: str = "primary") -> list[float]:
        with self._lock:
            return [arrived for _, arrived in self.rows.get((run_uid, stream), {}).values()]

    def closed_for(self, run_uid: str) -> list[str]:
        with self._lock:
            return [uri for uri in self.closed if run_uid in uri]

    def problems(self, run_uid: str, expected_rows: int, stream: str = "primary") -> list[str]:
        """Gaps or duplicates in Tiled's sequence numbers and in the rows' seq_num; [] if none."""
        key = (run_uid, stream)
        with self._lock:
            sequences = list(self.sequences.get(key, []))
            seq_nums = set(self.rows.get(key, {}))
            redelivered = self.redelivered.get(key, 0)
            resyncs = self.resyncs.get(key, 0)
        found = []
        if sequences != list(range(1, len(sequences) + 1)):
            found.append(f"Tiled sequence numbers not 1..{len(sequences)} in order: {sequences[:20]}")
        if redelivered:
            found.append(f"{redelivered} rows delivered twice")
        if resyncs:
            found.append(f"{resyncs} gaps filled over HTTP")
        if seq_nums != set(range(1, expected_rows + 1)):
            found.append(f"rows held {len(seq_nums)}, expected seq_num 1..{expected_rows}")
        return found

    def disconnect(self, timeout: float = 30.0) -> None:
        """Let go of every subscription; give up waiting for tiled's threads after `timeout` s."""
        import threading

        closing = threading.Thread(target=self.subscription.disconnect, daemon=True)
        closing.start()
        closing.join(timeout)
