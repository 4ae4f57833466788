"""sd_notify: READY, WATCHDOG, STATUS and STOPPING reach a fake NOTIFY_SOCKET.

The fake is what systemd provides: a real AF_UNIX datagram socket, either a
path or an abstract name (``@name``). Without NOTIFY_SOCKET every call is a
no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tiled_writer_sidecar.daemon.sdnotify import Notifier

RECEIVE_TIMEOUT_S = 5.0


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, bind_address: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(bind_address)
        self.socket.settimeout(RECEIVE_TIMEOUT_S)

    def receive(self) -> str:
        """The next datagram (fails after RECEIVE_TIMEOUT_S instead of hanging)."""
        return self.socket.recv(4096).decode()

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        messages = []
        self.socket.setblocking(False)
        try:
            while True:
                messages.append(self.socket.recv(4096).decode())
        except BlockingIOError:
            return messages
        finally:
            self.socket.settimeout(RECEIVE_TIMEOUT_S)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def path_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    """NOTIFY_SOCKET=/path/to/socket, as systemd sets it for system services."""
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 107 bytes"
    fake = FakeSystemd(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    """NOTIFY_SOCKET=@name: a Linux abstract socket (no file; systemd may use these)."""
    name = f"tiled-writer-sidecar-test-{os.getpid()}-{os.urandom(4).hex()}"
    fake = FakeSystemd("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield fake
    fake.close()


@pytest.fixture
def notifiers() -> Iterator[list[Notifier]]:
    """Notifiers made by a test, closed afterwards.

    Closing them keeps ResourceWarning out of the tests.
    """
    made: list[Notifier] = []
    yield made
    for notifier in made:
        notifier.close()


@pytest.fixture
def new_notifier(notifiers: list[Notifier]) -> Callable[[], Notifier]:
    """Make a Notifier from the current environment (as the daemon does at start)."""

    def make() -> Notifier:
        notifier = Notifier()
        notifiers.append(notifier)
        return notifier

    return make


@pytest.fixture(params=["path", "abstract"])
def fake_systemd(request: pytest.FixtureRequest) -> FakeSystemd:
    fixture: FakeSystemd = request.getfixturevalue(f"{request.param}_systemd")
    return fixture


def test_ready_is_sent(fake_systemd: FakeSystemd, new_notifier: Callable[[], Notifier]) -> None:
    notifier = new_notifier()
    assert notifier.enabled
    notifier.ready()
    assert fake_systemd.receive() == "READY=1"


def test_ready_can_carry_a_status_in_the_same_datagram(
    fake_systemd: FakeSystemd, new_notifier: Callable[[], Notifier]
) -> None:
    """READY and STATUS arrive together, so `systemctl status` never shows a stale status."""
    new_notifier().ready("receiving")
    assert fake_systemd.receive().split("\n") == ["READY=1", "STATUS=receiving"]


def test_watchdog_is_sent(fake_systemd: FakeSystemd, new_notifier: Callable[[], Notifier]) -> None:
    new_notifier().watchdog()
    assert fake_systemd.receive() == "WATCHDOG=1"


def test_status_is_sent(fake_systemd: FakeSystemd, new_notifier: Callable[[], Notifier]) -> None:
    new_notifier().status("received 12 docs, spool 4096 bytes, tiled up")
    assert fake_systemd.receive() == "STATUS=received 12 docs, spool 4096 bytes, tiled up"


def test_stopping_is_sent(fake_systemd: FakeSystemd, new_notifier: Callable[[], Notifier]) -> None:
    new_notifier().stopping()
    assert fake_systemd.receive() == "STOPPING=1"


def test_a_daemon_lifetime_arrives_in_order(
    fake_systemd: FakeSystemd, new_notifier: Callable[[], Notifier]
) -> None:
    """READY, then WATCHDOG/STATUS while running, then STOPPING: one datagram each, in order."""
    notifier = new_notifier()
    notifier.ready("receiving")
    notifier.watchdog()
    notifier.status("backlog 3 runs")
    notifier.watchdog()
    notifier.stopping()
    received = [fake_systemd.receive() for _ in range(5)]
    assert received == [
        "READY=1\nSTATUS=receiving",
        "WATCHDOG=1",
        "STATUS=backlog 3 runs",
        "WATCHDOG=1",
        "STOPPING=1",
    ]
    assert fake_systemd.pending() == []


def test_without_notify_socket_every_call_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, new_notifier: Callable[[], Notifier]
) -> None:
    """Outside systemd the notifier is disabled and never raises."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = new_notifier()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("receiving")
    notifier.watchdog()
    notifier.status("x")
    notifier.stopping()
    assert not notifier.enabled


def test_a_vanished_notify_socket_does_not_crash_the_daemon(
    path_systemd: FakeSystemd, tmp_path: Path, new_notifier: Callable[[], Notifier]
) -> None:
    """If systemd's socket goes away (daemon-reexec, a test), notifying is silently skipped."""
    notifier = new_notifier()
    path_systemd.close()
    (tmp_path / "notify").unlink()
    notifier.watchdog()
    notifier.stopping()
    assert notifier.enabled


@pytest.mark.parametrize(
    ("watchdog_usec", "interval"),
    [("30000000", 15.0), ("1000000", 0.5), ("", None), ("not-a-number", None)],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch,
    watchdog_usec: str,
    interval: float | None,
    new_notifier: Callable[[], Notifier],
) -> None:
    """WatchdogSec=30 gives WATCHDOG_USEC=30000000: ping at least every 15 s (systemd advises half)."""
    monkeypatch.setenv("WATCHDOG_USEC", watchdog_usec)
    assert new_notifier().watchdog_interval == interval
