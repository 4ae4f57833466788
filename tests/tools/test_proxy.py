"""`tiled_writer_sidecar.tools.proxy.main`: the buffer's rules (fast, no sockets), the command line and its unit.

The buffer is driven with a fake sender whose capacity the test controls,
so every rule of the module docstring is checked exactly: order, nothing
lost while under the limit, lossy sends (counted) only for what would
block past it, counters. The command-line tests start the real
`tiled-writer-sidecar proxy` for a second each: one-line errors with the
contract's exit codes, sd_notify READY/STOPPING, clean exit on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from tiled_writer_sidecar.errors import ConfigError
from tiled_writer_sidecar.receive.subscription import REPLAY_TOPIC
from tiled_writer_sidecar.testing.ports import LOCALHOST, free_port, wait_until
from tiled_writer_sidecar.testing.proxy import sidecar_proxy_command
from tiled_writer_sidecar.tools.proxy.main import (
    MESSAGE_OVERHEAD,
    PIPE_MESSAGES,
    BurstBuffer,
    Message,
    ProxyOptions,
    normalize_address,
    parse_size,
)
from tiled_writer_sidecar.tools.proxy.replay import ReplayRing

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "tiled-writer-sidecar-proxy.service"


class FakeSubscriber:
    """A sender that takes `room` messages, then blocks (lossless) or drops (lossy) until given more."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.got: list[Message] = []
        self.lossy_sends = 0

    def __call__(self, message: Message, lossy: bool) -> bool:
        if self.room > 0:
            self.room -= 1
            self.got.append(message)
            return True
        if lossy:
            self.lossy_sends += 1
            return True
        return False


def msg(i: int, size: int = 100) -> bytes:
    return f"{i:08d}".encode().ljust(size, b"x")


def test_everything_passes_in_order_when_the_subscriber_keeps_up() -> None:
    """No blocking: every message goes out, in order; counters match; nothing stays buffered."""
    buffer = BurstBuffer(10_000)
    sub = FakeSubscriber(room=1000)
    for i in range(500):
        buffer.append(msg(i), 0.0)
        assert not buffer.forward(sub, 0.0)
    assert sub.got == [msg(i) for i in range(500)]
    s = buffer.stats
    assert (s.received, s.sent, s.dropped, s.buffered, s.buffered_bytes) == (500, 500, 0, 0, 0)
    assert s.received_bytes == s.sent_bytes == 500 * 100


def test_a_blocked_subscriber_is_waited_for_while_under_the_limit() -> None:
    """Blocked: messages stay buffered (head first), and all arrive in order once there is room."""
    buffer = BurstBuffer(1_000_000)
    sub = FakeSubscriber(room=10)
    for i in range(100):
        buffer.append(msg(i), 0.0)
    assert buffer.forward(sub, 0.0) is True
    assert len(buffer) == 90 and buffer.bytes == 90 * (100 + MESSAGE_OVERHEAD)
    assert buffer.stats.blocked_sends == 1
    sub.room = 1000
    assert buffer.forward(sub, 0.0) is False
    assert sub.got == [msg(i) for i in range(100)]
    assert buffer.stats.dropped == 0


def test_past_the_limit_what_would_block_is_sent_lossy_and_counted() -> None:
    """Over the limit: each message that would block is sent lossy (counted dropped) until the buffer
    is back within its limit; the bytes held never exceed the limit when forward returns."""
    per = 100 + MESSAGE_OVERHEAD
    buffer = BurstBuffer(50 * per)
    sub = FakeSubscriber(room=0)
    for i in range(80):
        buffer.append(msg(i), 0.0)
        buffer.forward(sub, 0.0)
        assert buffer.bytes <= buffer.max_bytes
    s = buffer.stats
    assert s.dropped == sub.lossy_sends == 80 - 50
    assert s.sent == s.dropped and len(buffer) == 50
    assert s.overflows == 1 and buffer.overflowing
    assert s.buffered_bytes_peak == 51 * per  # one message over, for one forward at most
    sub.room = 1000
    buffer.forward(sub, 0.0)
    assert sub.got == [msg(i) for i in range(30, 80)]  # the oldest went lossy, the rest in order
    assert not buffer.overflowing and len(buffer) == 0


def test_past_the_limit_a_full_subscriber_gets_over_grace_to_make_room() -> None:
    """Over the limit with over_grace 0.2 s: a blocked head waits (the proxy reads nothing meanwhile);
    a subscriber that makes room within the grace misses nothing; past it, the send goes lossy."""
    per = 100 + MESSAGE_OVERHEAD
    buffer = BurstBuffer(5 * per, over_grace=0.2)
    sub = FakeSubscriber(room=0)
    for i in range(6):
        buffer.append(msg(i), 0.0)
    assert buffer.forward(sub, 0.0) and buffer.forward(sub, 0.1)  # blocked, within the grace
    sub.room = 1
    assert buffer.forward(sub, 0.15) and sub.got == [msg(0)] and buffer.stats.dropped == 0
    buffer.append(msg(6), 0.15)
    assert buffer.forward(sub, 0.3)  # blocked again since 0.15: within the grace
    assert buffer.forward(sub, 0.36)  # past the grace: the head went lossy, the rest waits within the limit
    assert buffer.stats.dropped == sub.lossy_sends == 1 and buffer.bytes == buffer.max_bytes


def test_lossless_sends_are_tried_first_even_past_the_limit() -> None:
    """Past the limit a message the subscriber can take is delivered, not dropped."""
    per = 100 + MESSAGE_OVERHEAD
    buffer = BurstBuffer(5 * per)
    for i in range(10):
        buffer.append(msg(i), 0.0)
    sub = FakeSubscriber(room=3)
    buffer.forward(sub, 0.0)
    assert sub.got == [msg(0), msg(1), msg(2)]
    assert buffer.stats.dropped == 2 and len(buffer) == 5


def test_a_zero_limit_forwards_whatever_the_subscriber_takes_and_drops_the_rest() -> None:
    """--max-buffer-bytes 0 degrades to bluesky's behaviour (drop when full), never a crash."""
    buffer = BurstBuffer(0)
    sub = FakeSubscriber(room=2)
    for i in range(5):
        buffer.append(msg(i), 0.0)
        buffer.forward(sub, 0.0)
    assert len(sub.got) == 2 and buffer.stats.dropped == 3 and len(buffer) == 0


def test_a_subscriber_that_reads_nothing_for_stall_seconds_no_longer_holds_the_others() -> None:
    """Under the byte limit, a blocked head waits `stall_seconds`; after that every message that would
    block goes lossy at once (one stall, each counted dropped) until a lossless send goes through."""
    buffer = BurstBuffer(10**9, stall_seconds=5.0)
    sub = FakeSubscriber(room=0)
    buffer.append(msg(0), 0.0)
    assert buffer.forward(sub, 0.0) is True
    assert buffer.forward(sub, 4.9) is True and buffer.stats.dropped == 0
    assert buffer.forward(sub, 5.0) is False and buffer.stalled
    for i in range(1, 4):
        buffer.append(msg(i), 5.1)
        assert buffer.forward(sub, 5.1) is False
    assert buffer.stats.dropped == sub.lossy_sends == 4 and buffer.stats.stalls == 1
    sub.room = 1
    buffer.append(msg(4), 6.0)
    buffer.forward(sub, 6.0)
    assert sub.got == [msg(4)] and not buffer.stalled
    buffer.append(msg(5), 6.1)
    assert buffer.forward(sub, 6.1) is True  # lossless again: waits anew


def test_oldest_buffered_arrival_and_replays_go_ahead_of_what_waits() -> None:
    """stats.oldest_buffered_at is the head's arrival; `prepend` puts a replay first, in order,
    without counting it as received, and `on_sent` hears that it was a replay."""
    heard: list[tuple[bytes, bool]] = []
    buffer = BurstBuffer(10**6, on_sent=lambda m, _size, replayed: heard.append((m, replayed)))
    buffer.append(msg(2), 7.0)
    assert buffer.stats.oldest_buffered_at == 7.0
    buffer.prepend([msg(0), msg(1)], 8.0)
    buffer.forward(FakeSubscriber(room=10), 8.0)
    assert heard == [(msg(0), True), (msg(1), True), (msg(2), False)]
    assert buffer.stats.received == 1 and buffer.stats.oldest_buffered_at is None


def test_replay_ring_replays_since_departure_minus_margin_only_to_a_returning_holder() -> None:
    """The ring replays nothing to a first subscription; after the holder of REPLAY_TOPIC goes and
    comes back it replays what was sent from `margin` before it left, and trims by age and bytes."""
    ring = ReplayRing(seconds=100.0, max_bytes=10**6, margin=2.0)
    subscribe, unsubscribe = b"\x01" + REPLAY_TOPIC, b"\x00" + REPLAY_TOPIC
    assert ring.subscription(subscribe, 0.0) is None
    for t in range(10):
        ring.record(msg(t), 164, float(t))
    assert ring.subscription(b"\x01", 9.0) is None  # another subscriber's subscription
    assert ring.subscription(unsubscribe, 9.5) is None
    ring.record(msg(10), 164, 10.0)
    assert ring.subscription(subscribe, 11.0) == [msg(t) for t in range(8, 11)]
    assert ring.subscription(subscribe, 12.0) is None  # a second holder: nobody had left
    small = ReplayRing(seconds=3.0, max_bytes=2 * 164)
    for t in range(10):
        small.record(msg(t), 164, float(t))
    assert small.held_bytes == 2 * 164


@pytest.mark.parametrize(
    ("budget", "largest", "bounded"),
    [(256 * 2**20, 16 * 2**20, 256 * 2**10), (4 * 2**20, 256 * 2**10, 4096), (2**36, 64 * 2**20, 2**26)],
)
def test_pipes_are_sized_from_the_byte_budget(budget: int, largest: int, bounded: int) -> None:
    """A message is at most a sixteenth of --max-buffer-bytes (64 MiB at most, as the sidecar's decoder):
    a 1 MiB document passes the default proxy; PIPE_MESSAGES of messages up to `pipe_bound_message_bytes`
    (256 KiB by default) fill a pipe's quarter of the budget at most."""
    options = ProxyOptions(max_buffer_bytes=budget)
    assert options.max_message_bytes == largest
    assert options.pipe_bound_message_bytes == bounded
    assert PIPE_MESSAGES * options.pipe_bound_message_bytes <= budget // 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("268435456", 268435456),
        ("256MiB", 256 * 2**20),
        ("256M", 256 * 10**6),
        ("1GiB", 2**30),
        ("4 kib", 4096),
    ],
)
def test_sizes_are_read_with_units(text: str, expected: int) -> None:
    """--max-buffer-bytes takes plain bytes or a unit (binary with i, decimal without)."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "12 parsecs", "1.5G"])
def test_a_bad_size_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


@pytest.mark.parametrize(
    ("given", "endpoint"),
    [
        (None, "tcp://*"),
        ("5577", "tcp://0.0.0.0:5577"),
        ("127.0.0.1:5577", "tcp://127.0.0.1:5577"),
        ("tcp://127.0.0.1:5577", "tcp://127.0.0.1:5577"),
        ("ipc:///tmp/proxy.sock", "ipc:///tmp/proxy.sock"),
    ],
)
def test_addresses_are_read_as_bluesky_reads_them(given: str | None, endpoint: str) -> None:
    """The forms bluesky-0MQ-proxy accepts (bluesky.callbacks.zmq._normalize_address after its int())."""
    from bluesky.callbacks.zmq import _normalize_address

    assert normalize_address(given) == endpoint
    bluesky_form = int(given) if given is not None and given.isdigit() else given
    assert _normalize_address(bluesky_form) == endpoint


# -- the command ---------------------------------------------------------------------------


def run_proxy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*sidecar_proxy_command(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.process
def test_address_in_use_is_exit_1_with_one_line() -> None:
    """Another process holds --in-address: exit 1, one line naming the address, no traceback."""
    port = free_port()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        holder = context.socket(zmq.PUB)
        holder.bind(f"tcp://{LOCALHOST}:{port}")
        done = run_proxy("--in-address", f"tcp://{LOCALHOST}:{port}", "--out-address", str(free_port()))
    finally:
        context.destroy(linger=0)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "address already in use" in lines[0] and str(port) in lines[0], done.stderr


@pytest.mark.process
@pytest.mark.parametrize(
    "args",
    [
        ["--in-address", "tcp://127.0.0.1:notaport", "--out-address", "tcp://127.0.0.1:0"],
        ["--in-address", "bogus://x", "--out-address", "tcp://127.0.0.1:0"],
        ["--max-buffer-bytes", "lots"],
        [
            "--max-buffer-bytes",
            "1000",
            "--in-address",
            "tcp://127.0.0.1:0",
            "--out-address",
            "tcp://127.0.0.1:0",
        ],
        ["--metrics-address", "nowhere"],
        ["--no-such-flag"],
    ],
)
def test_bad_arguments_are_exit_2_with_one_line(args: list[str]) -> None:
    """A bad address, size or flag: exit 2 and one line, no traceback."""
    done = run_proxy(*args)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.process
def test_sigterm_exits_0_after_ready_and_stopping_via_sd_notify(tmp_path: Path) -> None:
    """Under a NOTIFY_SOCKET the proxy sends READY=1 once bound, WATCHDOG=1, then STOPPING=1 on SIGTERM
    and exits 0 with a summary line."""
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    process = subprocess.Popen(
        [*sidecar_proxy_command(), "--in-address", str(free_port()), "--out-address", str(free_port())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        messages: list[str] = []

        def got(what: str) -> bool:
            while not any(what in m for m in messages):
                messages.append(notify.recv(4096).decode())
            return True

        wait_until(lambda: got("READY=1"), 30, what="READY=1")
        wait_until(lambda: got("WATCHDOG=1"), 30, what="WATCHDOG=1")
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: got("STOPPING=1"), 30, what="STOPPING=1")
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        notify.close()
    assert process.returncode == 0, err
    assert out.startswith("Receiving on address tcp://0.0.0.0:"), out
    assert "proxy stopped: in=0 out=0 dropped=0 unsent=0" in err, err


# -- the systemd unit ------------------------------------------------------------------------


@pytest.mark.process
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong with the unit (ExecStart pointed at this venv)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    unit = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert "/opt/tiled-writer-sidecar/bin/" in text
    unit.write_text(text.replace("/opt/tiled-writer-sidecar/bin/", f"{Path(sys.executable).parent}/"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if UNIT.name in line] == []


@pytest.mark.process
def test_unit_is_notify_with_watchdog_and_flags_the_command_accepts() -> None:
    """Type=notify with a watchdog; ExecStart uses exactly the proxy's flags; memory is limited."""
    text = UNIT.read_text()
    assert "\nType=notify\n" in text and "\nWatchdogSec=" in text and "\nMemoryMax=" in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    flags = [word for word in exec_start.split() if word.startswith("--")]
    assert flags == ["--in-address", "--out-address", "--max-buffer-bytes", "--metrics-address"]
    help_text = run_proxy("--help").stdout
    assert all(flag in help_text for flag in flags)


def bluesky_flags() -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "bluesky.commandline.zmq_proxy", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return {word.strip("[],") for word in done.stdout.split() if word.startswith(("--", "-v"))} - {"--help"}


@pytest.mark.process
def test_every_flag_of_bluesky_0mq_proxy_is_accepted() -> None:
    """Each option of `bluesky-0MQ-proxy --help` is in the project's proxy's --help too."""
    ours = run_proxy("--help").stdout
    missing = sorted(flag for flag in bluesky_flags() if flag not in ours)
    assert missing == [], missing
    assert len(bluesky_flags()) >= 16


@pytest.mark.process
@pytest.mark.parametrize(
    "args",
    [
        ["--in-client-secret", "x.key_secret", "--in-server-public", "y.key"],  # client keys on a bind side
        ["--out-mode", "connect", "--out-curve-secret", "x.key_secret"],  # server keys on a connect side
        ["--in-curve-secret", "/nonexistent.key_secret"],
        ["--in-mode", "connect"],  # connect needs an address
    ],
)
def test_curve_and_mode_mistakes_are_exit_2_with_one_line(args: list[str]) -> None:
    """bluesky's pairing rules for CURVE flags and modes, and unreadable keys: exit 2, one line."""
    done = run_proxy("--out-address", str(free_port()), *args)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
