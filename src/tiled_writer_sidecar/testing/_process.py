"""One child process in its own process group, with its output in a log file.

Every service fixture (Tiled, the 0MQ proxy, the sidecar itself) is a
`ManagedProcess`: started with `start_new_session=True`, so a signal sent
to its process group also reaches anything it spawned, and a Ctrl+C in the
terminal does not reach it behind our back. Its stdout and stderr go to a
log file that is appended to across restarts (each start writes a header
line), so a failing test can show it. Each live process is registered, and
an `atexit` hook SIGKILLs whatever a crashed test or an interrupted demo
left behind. A `LocalServer` is a `Service` whose process listens on a
127.0.0.1 port: it holds the start-up (retry on a taken port, readiness polled
with a deadline) that every such server shares.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tiled_writer_sidecar.testing.ports import LOCALHOST, free_port, wait_until

_LIVE: set[ManagedProcess] = set()


def console_script(name: str, module: str | None = None) -> list[str]:
    """The `name` CLI of this interpreter's environment, or ``python -m MODULE`` (default `name`) without
    its script."""
    executable = Path(sys.executable).parent / name
    if executable.exists():
        return [str(executable)]
    return [sys.executable, "-m", module or name]


def _kill_leftovers() -> None:
    for process in list(_LIVE):
        process.kill()


atexit.register(_kill_leftovers)


class ManagedProcess:
    """A subprocess whose whole process group is signalled and reaped."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        # Unbuffered, so the log file is current while the child runs.
        self.env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The process id (and process group id) of the running child."""
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        """True while the child has not exited (a stopped child is running)."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once the child is gone; negative for a signal."""
        return self._popen.poll() if self._popen is not None else None

    def spawn(self) -> None:
        """Start the child; it must not be running already."""
        if self.running:
            raise RuntimeError(f"{self.argv[0]} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== {stamp} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        _LIVE.add(self)

    def signal_group(self, signum: int) -> None:
        """Send `signum` to the child's process group while the child is unreaped.

        An unreaped child (alive or zombie) still owns its pid, so the group
        id cannot have been recycled for an unrelated process.
        """
        if self._popen is None or self._popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, signum)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL it after `timeout` s; return the exit status."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            # A paused (SIGSTOPped) process only acts on SIGTERM once continued.
            self.signal_group(signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL the group (children too) and reap the child."""
        _LIVE.discard(self)
        if self._popen is None:
            return None
        self.signal_group(signal.SIGKILL)
        return self._popen.wait()

    def pause(self) -> None:
        """SIGSTOP the group: sockets stay open, nothing is answered."""
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the group."""
        self.signal_group(signal.SIGCONT)

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of the log file ('' if there is none yet)."""
        return read_log_tail(self.log_path, lines)


def read_log_tail(path: Path, lines: int = 60) -> str:
    """The last `lines` lines of the log file at `path` ('' if there is none yet)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Service:
    """`with Service(...) as s:` starts `s` and always closes it, also if starting fails."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LocalServer(Service):
    """A server `ManagedProcess` on 127.0.0.1 and a port picked free at run time (or given).

    A subclass gives `name`, `log_path`, `command()` and `_answers()` (one
    readiness probe). `_start_process()` spawns it and polls `_answers()` with
    a deadline; a port from `free_port` can be taken before the server binds
    it, so on the very first start only, when the log then says `port_taken`,
    another free port is tried. A restart keeps the port (clients hold the URI).
    """

    #: What messages call the server.
    name = "server"
    #: Lower-case text of the server's log that means another process took the port first.
    port_taken = "address already in use"

    def __init__(self, *, port: int | None, startup_timeout: float) -> None:
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        #: Seconds from spawn to ready, one per start.
        self.startup_times: list[float] = []
        self._process: ManagedProcess | None = None
        self._spawned_at = 0.0

    @property
    def port(self) -> int:
        return self._port

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        """The exact argv of the server."""
        raise NotImplementedError

    def _answers(self) -> bool:
        """One readiness probe of the spawned server (False: not yet)."""
        raise NotImplementedError

    def _start_process(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Spawn (`_spawn`) and, with `wait`, wait until ready; on the first start retry a taken port."""
        attempts = 1 if (self._port_fixed or self.startup_times) else 3
        for attempt in range(attempts):
            self._spawn()
            if not wait:
                return
            try:
                self.wait_ready(timeout)
                return
            except RuntimeError:
                if attempt + 1 < attempts and self.port_taken in self.log_tail(20).lower():
                    self._port = free_port()
                    continue
                raise

    def _spawn(self, cwd: Path | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self._process = ManagedProcess(self.command(), log_path=self.log_path, cwd=cwd)
        self._process.spawn()
        self._spawned_at = time.monotonic()

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll `_answers()` until the server is ready; return seconds since spawn.

        Raises:
            RuntimeError: the process exited (its log tail is in the message).
            TimeoutError: not ready before the deadline (`startup_timeout` unless `timeout`).
        """
        process = self._require_process()

        def ready() -> bool:
            if not process.running:
                raise RuntimeError(
                    f"{self.name} exited with {process.returncode} during start-up;"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
            return self._answers()

        wait_until(
            ready,
            timeout if timeout is not None else self.startup_timeout,
            interval=0.1,
            what=f"{self.name} on {LOCALHOST}:{self._port} (log {self.log_path})",
        )
        elapsed = time.monotonic() - self._spawned_at
        self.startup_times.append(elapsed)
        return elapsed

    def log_tail(self, lines: int = 60) -> str:
        """The end of the server's log, for failure reports."""
        return read_log_tail(self.log_path, lines)

    def _require_process(self) -> ManagedProcess:
        if self._process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._process
