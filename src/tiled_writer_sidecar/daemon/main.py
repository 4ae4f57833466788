"""`tiled-writer-sidecar run`: the receiver loop, supervising the uploader.

The receiver runs in this process's main thread and is never blocked by
Tiled. The uploader runs as a child OS process (`upload.main`) that this
process restarts with backoff whenever it dies. The metrics endpoint is a
thread here. Under systemd: READY once the spool is open and the socket
subscribed, WATCHDOG from the receiver loop (a wedged uploader is killed and
restarted by its supervisor instead: restarting the whole service would
lose what 0MQ delivers meanwhile), STATUS with the backlog, STOPPING on
SIGTERM.

Shutdown (SIGTERM/SIGINT, or the injected `shutdown` event in tests): stop
receiving, fsync and close every open run's log, then SIGTERM the uploader
and give it ``UPLOADER_STOP_SECONDS`` before killing it. Nothing is lost
either way: a run whose upload was interrupted is rewritten on the next
start.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

from tiled_writer_sidecar.backoff import Backoff
from tiled_writer_sidecar.config import Config
from tiled_writer_sidecar.daemon.health import health_snapshot
from tiled_writer_sidecar.daemon.metrics import MetricsServer
from tiled_writer_sidecar.daemon.sdnotify import Notifier
from tiled_writer_sidecar.documents.validation import preload as preload_validation
from tiled_writer_sidecar.documents.wire import budget_for
from tiled_writer_sidecar.errors import ConfigError
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.receiver import Receiver
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.segment import bound_reads
from tiled_writer_sidecar.upload.main import RECEIVER_PID_ENV

log = logging.getLogger(__name__)

UPLOADER_STOP_SECONDS = 20.0
UPLOADER_RESTART_INITIAL_S = 1.0  # restart backoff of a dead uploader process (backoff.Backoff)
UPLOADER_RESTART_MAX_S = 60.0
UPLOADER_STALE_SECONDS = 600.0
#: Descriptors besides one per open run: 0MQ's sockets and pipes, /metrics, locks, libraries (~60 measured).
FDS_BESIDES_RUNS = 128
STATUS_INTERVAL_S = 5.0


class UploaderSupervisor:
    """Keeps one uploader child process running; restarts it with backoff.

    The child gets the effective config as JSON through a pipe on its stdin,
    never in its argv (readable by every local user in the process list).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._started = 0.0
        self._next_start = 0.0
        self.backoff = Backoff(UPLOADER_RESTART_INITIAL_S, UPLOADER_RESTART_MAX_S)

    def check(self) -> None:
        if self.process is not None:
            code = self.process.poll()
            if code is None:
                return
            delay = self.backoff.next_delay()
            log.error("uploader exited with code %s; restarting in %.1f s", code, delay)
            self.process = None
            self._next_start = time.monotonic() + delay
            self.restarts += 1
        if time.monotonic() >= self._next_start:
            self.start()

    def command(self) -> list[str]:
        """The uploader's argv: no configuration in it."""
        return [sys.executable, "-m", "tiled_writer_sidecar.upload.main"]

    def start(self) -> None:
        # Only the main process talks to systemd (NotifyAccess=main).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
        env[RECEIVER_PID_ENV] = str(os.getpid())  # it dies with us (upload/main.py)
        process = subprocess.Popen(self.command(), stdin=subprocess.PIPE, env=env)
        assert process.stdin is not None
        try:
            # A few hundred bytes: far below a pipe's buffer, so this never blocks.
            process.stdin.write(json.dumps(self.config.as_dict()).encode())
            process.stdin.close()
        except OSError as err:  # the child died at once; check() restarts it
            log.error("uploader pid=%d did not take its config: %s", process.pid, err)
        self.process = process
        self._started = time.monotonic()
        log.info("uploader started pid=%d", process.pid)

    def healthy_started(self) -> None:
        """Reset the restart backoff once a child has stayed up for a minute."""
        if self.process is not None and time.monotonic() - self._started > 60:
            self.backoff.reset()
            self.restarts = 0

    def kill_if_stale(self, status_age: float | None) -> None:
        """A wedged uploader (no status for too long) is killed; `check` restarts it."""
        running_for = time.monotonic() - self._started
        stale = status_age is not None and min(status_age, running_for) > UPLOADER_STALE_SECONDS
        if self.alive() and stale:
            assert self.process is not None
            log.error("uploader wedged: no progress report for %.0f s; killing it", status_age)
            self.process.kill()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("uploader did not stop within %.0f s; killing it", timeout)
                self.process.kill()
                self.process.wait()
        self.process = None


def ensure_file_limit(max_open_runs: int) -> int:
    """Raise the soft RLIMIT_NOFILE to what `max_open_runs` needs (up to the hard limit); return it.

    ConfigError (exit 2) if even the hard limit is too low: better than
    failing on the 1,000th open run at 3 a.m.
    """
    needed = max_open_runs + FDS_BESIDES_RUNS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(
            f"[spool] max_open_runs = {max_open_runs} needs {needed} file descriptors, the limit is {hard}: "
            "lower max_open_runs or raise LimitNOFILE= in the unit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


def run_daemon(config: Config, shutdown: threading.Event | None = None) -> int:
    """Run until `shutdown` is set or SIGTERM/SIGINT arrives; return the exit code."""
    shutdown = shutdown or threading.Event()
    ensure_file_limit(config.spool.max_open_runs)
    notifier = Notifier()
    os.umask(0o077)
    spool = SpoolDir(config.spool_dir, quarantine_max_bytes=config.spool.quarantine_max_bytes)
    spool.lock("receiver")
    preload_validation()  # no document waits on a compile or an import (they need descriptors)
    bound_reads(config.spool.segment_bytes, budget_for(config.zmq.max_message_bytes))
    stats = ReceiverStats()
    receiver = Receiver(config, spool, stats)
    metrics: MetricsServer | None = None
    if config.metrics.address:
        try:
            metrics = MetricsServer(config.metrics.address, stats, spool)
        except OSError as err:
            receiver.close()
            raise ConfigError(f"cannot serve metrics on {config.metrics.address}: {err.strerror}") from None
        metrics.start()
    supervisor = UploaderSupervisor(config)
    supervisor.start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        shutdown.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    log.info(
        "sidecar running zmq=%s spool=%s tiled=%s metrics=%s",
        config.zmq.address,
        spool.root,
        config.tiled.uri,
        f"http://{config.metrics.address}" if metrics else "off",
    )
    if warning := config.insecure_transport_warning():
        log.warning("%s", warning)
    notifier.ready("receiving")
    last_status = last_ping = 0.0
    try:
        while not shutdown.is_set():
            receiver.poll_once(100)
            supervisor.check()
            supervisor.healthy_started()
            now = time.monotonic()
            if metrics is not None:
                metrics.loop_beat = time.time()
            # The receiver loop is alive (we are in it); the uploader is watched by
            # its supervisor, so a wedged uploader is restarted, never the receiver.
            if notifier.watchdog_interval and now - last_ping >= notifier.watchdog_interval:
                last_ping = now
                notifier.watchdog()
            if now - last_status >= STATUS_INTERVAL_S:
                last_status = now
                snapshot = health_snapshot(stats, spool, time.time())
                supervisor.kill_if_stale(snapshot.upload.status_age_seconds)
                notifier.status(snapshot.status_line())
    finally:
        notifier.stopping()
        notifier.close()
        log.info("shutting down: closing the spool, stopping the uploader")
        receiver.close()
        supervisor.stop(UPLOADER_STOP_SECONDS)
        if metrics is not None:
            metrics.stop()
        spool.unlock()
        log.info("stopped")
    return 0
