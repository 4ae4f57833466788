"""A throwaway PostgreSQL server, and a Tiled server that keeps everything in it.

This is how facilities run Tiled: the catalog (nodes, metadata, data
sources) in PostgreSQL through asyncpg, and the appendable tables
(TiledWriter's ``internal`` tables) in PostgreSQL too, through the ADBC
PostgreSQL driver. `PostgresServer` runs Debian's ``postgresql`` binaries
(``/usr/lib/postgresql/<major>/bin``, or ``initdb`` on ``PATH``) on a free
127.0.0.1 port; `PostgresTiledServer` is a `TiledServer` whose command is

    tiled serve catalog postgresql://tiled:PW@127.0.0.1:PORT/catalog --init
        --write DIR/data --write postgresql://tiled:PW@127.0.0.1:PORT/tables
        --api-key KEY --host 127.0.0.1 --port PORT

Tiled turns the catalog's ``postgresql://`` into ``postgresql+asyncpg://``
itself (`tiled.utils.ensure_specified_sql_driver`), and ``--init`` runs
``tiled catalog init --if-not-exists`` on it, so a restart on the same
databases keeps every run. A ``--write postgresql://...`` location is a
`tiled.storage.RemoteSQLStorage` (the only server-based tabular storage
Tiled accepts).

Root: PostgreSQL refuses to run as root, and the test suite runs as root in
CI. Then every server-side command (``initdb``, ``postgres``) is exec'd as
the ``postgres`` account with ``setpriv --reuid --regid --init-groups`` (no
PAM session, no intermediate process: the managed pid *is* the postmaster,
so signals reach it directly; ``runuser -u postgres --`` is the fallback),
and the cluster lives in a fresh ``mkdtemp`` directory in the system
temporary directory, owned by ``postgres`` (pytest's ``tmp_path`` is under a
0700 root directory the postgres account cannot enter, and its paths can be
too long for a Unix socket). Clients (``psql``, ``pg_isready``, Tiled) stay
root and connect over TCP with passwords
(``scram-sha-256`` for every connection, set by ``initdb --auth``).

Lifecycle: `start()` runs ``initdb`` once, spawns ``postgres -D DATA -p PORT
-k SOCKETDIR -h 127.0.0.1`` as a `ManagedProcess` (own process group, log in
``DIRECTORY/postgres.log``), polls ``pg_isready`` until it accepts
connections (deadline, no fixed sleep), and on the first start creates the
login role and its databases. `stop()` is a *fast* shutdown (SIGINT: abort
sessions, checkpoint, exit; SIGTERM would wait for every client to hang
up). `close()` stops and deletes the cluster. ``fsync`` is off by default:
the tests exercise Tiled and the sidecar, not PostgreSQL's crash safety.

Test-only (the tests and `benchmarks.scale_out`, from a checkout): it lives
here, not in `tiled_writer_sidecar.testing`, so the wheel never holds it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from tiled_writer_sidecar.testing._process import LocalServer, Service
from tiled_writer_sidecar.testing.ports import LOCALHOST, wait_until
from tiled_writer_sidecar.testing.tiled_server import DEFAULT_STARTUP_TIMEOUT as DEFAULT_TILED_STARTUP_TIMEOUT
from tiled_writer_sidecar.testing.tiled_server import TiledServer

#: The account PostgreSQL runs as when we are root (Debian's package creates it).
POSTGRES_ACCOUNT = "postgres"

#: How long `initdb` plus the first start may take.
DEFAULT_STARTUP_TIMEOUT = 60.0

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")


def postgres_bindir() -> Path | None:
    """Directory with ``initdb``/``postgres``/``pg_isready``/``psql``, newest major first; None if absent."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else -1,
        reverse=True,
    )
    for initdb in candidates:
        if all((initdb.parent / tool).exists() for tool in ("postgres", "pg_isready", "psql")):
            return initdb.parent
    found = shutil.which("initdb")
    if found is not None:
        bindir = Path(found).parent
        if all((bindir / tool).exists() for tool in ("postgres", "pg_isready", "psql")):
            return bindir
    return None


def _run_as_prefix() -> list[str]:
    """argv prefix that runs a server-side PostgreSQL command as a non-root account."""
    if os.geteuid() != 0:
        return []
    account = pwd.getpwnam(POSTGRES_ACCOUNT)
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups"]
    runuser = shutil.which("runuser")
    if runuser is not None:
        return [runuser, "-u", POSTGRES_ACCOUNT, "--"]
    raise RuntimeError("running as root, but neither setpriv nor runuser is installed")


def _temporary_parent() -> str:
    """The system temporary directory if every other user can traverse it, else ``/tmp``."""
    parent = Path(tempfile.gettempdir()).resolve()
    if all(p.stat().st_mode & 0o001 for p in (parent, *parent.parents)):
        return str(parent)
    return "/tmp"


def postgres_unavailable() -> str | None:
    """Why `PostgresServer` cannot run here (for `pytest.skip`), or None if it can."""
    if postgres_bindir() is None:
        return (
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb);"
            " install Debian's postgresql package (scripts/system-deps.sh)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(POSTGRES_ACCOUNT)
        except KeyError:
            return f"running as root and there is no {POSTGRES_ACCOUNT!r} account to run PostgreSQL as"
        if shutil.which("setpriv") is None and shutil.which("runuser") is None:
            return "running as root and neither setpriv nor runuser is installed"
    return None


class PostgresServer(LocalServer):
    """A PostgreSQL cluster of its own on a free 127.0.0.1 port.

    `uri` is ``postgresql://USER:PASSWORD@127.0.0.1:PORT/DB`` for the first
    of `databases`; `database_uri(name)` for any of them. The role `user`
    owns every database and is not a superuser.
    """

    name = "postgres"
    port_taken = "could not bind"

    def __init__(
        self,
        directory: Path | str,
        *,
        port: int | None = None,
        user: str = "tiled",
        databases: Sequence[str] = ("catalog", "tables"),
        fsync: bool = False,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        for name in (user, *databases):
            if not _IDENTIFIER.fullmatch(name):
                raise ValueError(f"not a plain lower-case SQL identifier: {name!r}")
        if not databases:
            raise ValueError("at least one database is needed")
        super().__init__(port=port, startup_timeout=startup_timeout)
        self._directory = Path(directory).resolve()
        self.user = user
        self.databases = tuple(databases)
        self.password = secrets.token_hex(16)
        self._superuser_password = secrets.token_hex(16)
        self.fsync = fsync
        self._root: Path | None = None
        self._initialized = False
        self._created = False

    # -- where things are -------------------------------------------------

    @property
    def directory(self) -> Path:
        """Where the log is (the cluster itself is in `root`)."""
        return self._directory

    @property
    def root(self) -> Path:
        """The directory that holds the cluster (``data``) and the socket directory."""
        if self._root is None:
            raise RuntimeError("PostgreSQL was never started")
        return self._root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_path(self) -> Path:
        return self._directory / "postgres.log"

    @property
    def uri(self) -> str:
        """``postgresql://user:password@127.0.0.1:PORT/<first database>``."""
        return self.database_uri(self.databases[0])

    def database_uri(self, database: str) -> str:
        """A libpq/SQLAlchemy URI for `database` as the owning role."""
        if database not in self.databases:
            raise KeyError(f"{database!r} is not one of {self.databases}")
        return f"postgresql://{self.user}:{self.password}@{LOCALHOST}:{self._port}/{database}"

    def command(self) -> list[str]:
        """The exact argv of the postmaster."""
        bindir = self._bindir()
        argv = [
            *_run_as_prefix(),
            str(bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self._port),
            "-k",
            str(self.socket_dir),
            "-h",
            LOCALHOST,
        ]
        if not self.fsync:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        return argv

    # -- lifecycle --------------------------------------------------------

    def start(self, *, timeout: float | None = None) -> Self:
        """initdb (first time), spawn, wait for connections, create role and databases (first time).

        On the very first start a port taken before the postmaster bound it is
        replaced by another free one (`LocalServer`).
        """
        self._initdb()
        self._start_process(timeout=timeout)
        if not self._created:
            self._create_databases()
            self._created = True
        return self

    def _bindir(self) -> Path:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError(postgres_unavailable() or "PostgreSQL not found")
        return bindir

    def _initdb(self) -> None:
        if self._initialized:
            return
        self._directory.mkdir(parents=True, exist_ok=True)
        # A short path (a Unix socket path must fit in 107 bytes) that the
        # postgres account can reach; owned by that account when we are root.
        root = Path(tempfile.mkdtemp(prefix="tws-postgres-", dir=_temporary_parent()))
        account = None
        if os.geteuid() == 0:
            account = pwd.getpwnam(POSTGRES_ACCOUNT)
            os.chown(root, account.pw_uid, account.pw_gid)
        self._root = root
        self.socket_dir.mkdir(mode=0o700)
        password_file = root / "superuser-password"
        password_file.write_text(self._superuser_password + "\n")
        password_file.chmod(0o600)
        if account is not None:
            os.chown(self.socket_dir, account.pw_uid, account.pw_gid)
            os.chown(password_file, account.pw_uid, account.pw_gid)
        argv = [
            *_run_as_prefix(),
            str(self._bindir() / "initdb"),
            "-D",
            str(self.data_dir),
            "--username=postgres",
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        try:
            with self.log_path.open("ab") as log:
                log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} initdb: {' '.join(argv)}\n".encode())
                log.flush()
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=root,
                    timeout=self.startup_timeout,
                    check=False,
                )
        finally:
            password_file.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}); log {self.log_path}:\n{self.log_tail()}"
            )
        self._initialized = True

    def _spawn(self, cwd: Path | None = None) -> None:
        super()._spawn(cwd or self.root)

    def _answers(self) -> bool:
        """``pg_isready`` says the server accepts connections."""
        argv = [str(self._bindir() / "pg_isready"), "--host", LOCALHOST, "--port", str(self._port)]
        argv += ["--dbname", "postgres", "--timeout", "2"]
        return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0

    def psql(self, sql: str, *, database: str = "postgres", superuser: bool = True) -> str:
        """Run `sql` with ``psql`` over TCP; return its unaligned, tuples-only output.

        Raises:
            RuntimeError: psql failed (its stderr is in the message).
        """
        user, password = ("postgres", self._superuser_password) if superuser else (self.user, self.password)
        env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
        result = subprocess.run(
            [
                str(self._bindir() / "psql"),
                "--no-psqlrc",
                "--host",
                LOCALHOST,
                "--port",
                str(self._port),
                "--username",
                user,
                "--dbname",
                database,
                "--set",
                "ON_ERROR_STOP=1",
                "--tuples-only",
                "--no-align",
                "--command",
                sql,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}) on {sql!r}: {result.stderr.strip()}")
        return result.stdout

    def query(self, sql: str, *, database: str) -> list[list[str]]:
        """Rows of `sql` run as the owning role in `database`, each a list of text fields."""
        out = self.psql(sql, database=database, superuser=False)
        return [line.split("|") for line in out.splitlines() if line]

    def _create_databases(self) -> None:
        self.psql(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'")
        for database in self.databases:
            self.psql(f"CREATE DATABASE {database} OWNER {self.user}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """Fast shutdown (SIGINT), SIGKILL after `timeout` s; return the exit status."""
        process = self._process
        if process is None:
            return None
        if process.running:
            process.signal_group(signal.SIGINT)
            process.signal_group(signal.SIGCONT)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: not process.running, timeout, interval=0.05, what="postgres to shut down")
        return process.kill()  # reaps; SIGKILLs only if it is still there

    def restart(self, *, timeout: float | None = None) -> Self:
        """Stop and start again on the same port and cluster."""
        self.stop()
        return self.start(timeout=timeout)

    def close(self) -> None:
        """Stop the server and delete the cluster; safe to call again."""
        self.stop()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
            self._initialized = False
            self._created = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"PostgresServer({LOCALHOST}:{self._port}, {self._root}, {state})"


class PostgresTiledServer(TiledServer):
    """A `TiledServer` whose catalog and appendable tables are PostgreSQL databases.

    Arrays (zarr) still go to ``DIRECTORY/data``. Restarting it, or a new
    instance on the same `postgres` and databases, finds every run written
    before. The database password is in the command line and in Tiled's log
    (Tiled logs the catalog URI at start-up): fine for a throwaway cluster.
    ``workers=N`` serves it with N uvicorn worker processes (`TiledServer`).
    """

    def __init__(
        self,
        directory: Path | str,
        postgres: PostgresServer,
        *,
        catalog_database: str | None = None,
        tables_database: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(directory, **kwargs)
        self.postgres = postgres
        self.catalog_database = catalog_database or postgres.databases[0]
        self.tables_database = tables_database or postgres.databases[-1]

    # `TiledServer.command()` serves these two (and `config_text()` writes them).

    @property
    def catalog_uri(self) -> str:
        """``postgresql://...`` (Tiled adds ``+asyncpg`` itself)."""
        return self.postgres.database_uri(self.catalog_database)

    @property
    def tables_uri(self) -> str:
        """Tabular storage: a `tiled.storage.RemoteSQLStorage` (ADBC PostgreSQL driver)."""
        return self.postgres.database_uri(self.tables_database)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"PostgresTiledServer({self.uri}, catalog {self.catalog_database!r} on {self.postgres!r}, {state})"


class PostgresTiledDeployment(Service):
    """One Tiled deployment the way facilities scale it out: one PostgreSQL, several Tiled servers.

    Every server serves the same catalog and tables databases with the same
    API key (behind a load balancer a client may reach any of them); each has
    its own directory (log, arrays). The catalog is initialised once, before
    any server starts (``--init`` is not safe to race: two servers would both
    create its tables); then the servers start side by side. Each start may take `startup_timeout` (twice a
    lone server's: several servers start at once on a small machine).
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        servers: int = 2,
        fsync: bool = False,
        startup_timeout: float = 2 * DEFAULT_TILED_STARTUP_TIMEOUT,
    ) -> None:
        if servers < 1:
            raise ValueError("at least one Tiled server is needed")
        directory = Path(directory)
        self.postgres = PostgresServer(directory / "postgres", databases=("catalog", "tables"), fsync=fsync)
        self.api_key = secrets.token_hex(16)
        self.servers = [
            PostgresTiledServer(
                directory / f"tiled-{i}", self.postgres, api_key=self.api_key, startup_timeout=startup_timeout
            )
            for i in range(servers)
        ]

    def start(self) -> Self:
        self.postgres.start()
        self.init_catalog()
        for server in self.servers:  # side by side: each cold start is seconds of imports
            server.start(wait=False)
        for server in self.servers:
            server.wait_ready()
        return self

    def init_catalog(self) -> None:
        """``tiled catalog init --if-not-exists`` once, so the servers' own ``--init`` finds it done."""
        self.servers[0].init_catalog()

    def server_for(self, index: int) -> PostgresTiledServer:
        """The server client number `index` talks to (round robin, as a load balancer would)."""
        return self.servers[index % len(self.servers)]

    def client(self, **kwargs: Any) -> Any:
        """A client of the first server (every server shows the same catalog)."""
        return self.servers[0].client(**kwargs)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.postgres.close()

    def log_tail(self, lines: int = 60) -> str:
        """The end of every server's log and of PostgreSQL's, for failure reports."""
        parts = [f"-- {s.log_path}\n{s.log_tail(lines)}" for s in self.servers]
        parts.append(f"-- {self.postgres.log_path}\n{self.postgres.log_tail(lines)}")
        return "\n".join(parts)
