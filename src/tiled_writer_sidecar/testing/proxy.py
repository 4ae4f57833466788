"""A 0MQ proxy as a managed subprocess: bluesky's own or the project's.

`ZmqProxy()` runs bluesky's `bluesky-0MQ-proxy`, unchanged;
`ZmqProxy(kind="sidecar")` (or `SidecarProxy()`) runs `tiled-writer-sidecar
proxy`, the drop-in that buffers bursts, with its Prometheus endpoint on a
free port (`metrics()` reads it). Both take the same flags and speak the
same wire, so everything below holds for either.

The proxy binds a SUB socket (`in`, where RunEngine `Publisher`s connect)
and a PUB socket (`out`, where subscribers such as the sidecar connect) on
127.0.0.1 ports chosen at run time, and `restart()` reuses them, so
connected peers reconnect by themselves, as in production.

Readiness is real: with `probe=True` a private SUB connects to `out`, a
private PUB to `in`, and probe messages are published until one comes back
through the proxy. PUB/SUB drops whatever is sent before a subscription has
propagated (the slow-joiner problem), hence the repeated probes under a
deadline. A probe is the frame `PROBE_PREFIX b" probe " nonce` (the
Publisher framing with a prefix no Publisher uses, and a payload that is
not a pickle), and the proxy forwards it to *every* subscriber, so with
subscribers already attached use `probe=False` (the default of `restart`):
then readiness is a completed ZMTP handshake on both ports.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Self

import httpx
import zmq
from zmq.utils.monitor import recv_monitor_message

from tiled_writer_sidecar.testing._process import ManagedProcess, Service, console_script
from tiled_writer_sidecar.testing.ports import LOCALHOST, free_port, wait_until
from tiled_writer_sidecar.testing.sidecar import sidecar_command

#: First space-separated field of every probe frame (a Publisher "prefix").
PROBE_PREFIX = b"tiled-writer-sidecar-probe"

DEFAULT_STARTUP_TIMEOUT = 30.0

#: Which proxy: bluesky's `bluesky-0MQ-proxy` or `tiled-writer-sidecar proxy`.
ProxyKind = Literal["bluesky", "sidecar"]
PROXY_NAMES: dict[str, str] = {"bluesky": "bluesky-0MQ-proxy", "sidecar": "tiled-writer-sidecar proxy"}


def probe_message(nonce: bytes) -> bytes:
    """A probe frame in Publisher framing: `prefix name payload`."""
    return b" ".join([PROBE_PREFIX, b"probe", nonce])


def is_probe(message: bytes) -> bool:
    """True for a frame made by `probe_message` (receivers may drop these)."""
    return message.startswith(PROBE_PREFIX + b" ")


def proxy_command() -> list[str]:
    """The `bluesky-0MQ-proxy` CLI of this interpreter's environment."""
    return console_script("bluesky-0MQ-proxy", "bluesky.commandline.zmq_proxy")


def sidecar_proxy_command() -> list[str]:
    """`tiled-writer-sidecar proxy` of this interpreter's environment."""
    return [*sidecar_command(), "proxy"]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value} (comments skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _close(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    context.destroy(linger=0)


class ZmqProxy(Service):
    """A 0MQ proxy process on two 127.0.0.1 ports (`kind`: bluesky's or the project's).

    For ``kind="sidecar"``, `max_buffer_bytes` sets ``--max-buffer-bytes``
    (default: the proxy's) and ``--metrics-address`` is a free port.
    """

    def __init__(
        self,
        *,
        in_port: int | None = None,
        out_port: int | None = None,
        log_path: Path | str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        kind: ProxyKind = "bluesky",
        max_buffer_bytes: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if kind not in PROXY_NAMES:
            raise ValueError(f"kind must be one of {sorted(PROXY_NAMES)}, not {kind!r}")
        self.kind: ProxyKind = kind
        self.name = PROXY_NAMES[kind]
        self.max_buffer_bytes = max_buffer_bytes
        #: More flags (CURVE, modes); with a CURVE flag readiness is the metrics endpoint answering
        #: (``kind="sidecar"``): a probe without keys cannot pass.
        self.extra_args = list(extra_args)
        self._in_port = in_port if in_port is not None else free_port()
        self._out_port = out_port if out_port is not None else free_port()
        self.metrics_port: int | None = free_port() if kind == "sidecar" else None
        if log_path is None:
            stem = "bluesky-0MQ-proxy" if kind == "bluesky" else "tiled-writer-sidecar-proxy"
            log_path = Path(tempfile.gettempdir()) / f"{stem}-{self._in_port}-{self._out_port}.log"
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        #: Seconds from spawn to ready, one entry per start.
        self.startup_times: list[float] = []
        self._process = ManagedProcess(self.command(), log_path=self.log_path)
        self._spawned_at = 0.0

    @property
    def in_port(self) -> int:
        return self._in_port

    @property
    def out_port(self) -> int:
        return self._out_port

    @property
    def in_address(self) -> str:
        """Where Publishers connect, as `Publisher` accepts it: `127.0.0.1:IN`."""
        return f"{LOCALHOST}:{self._in_port}"

    @property
    def out_address(self) -> str:
        """Where subscribers connect: `tcp://127.0.0.1:OUT`."""
        return f"tcp://{LOCALHOST}:{self._out_port}"

    @property
    def running(self) -> bool:
        return self._process.running

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def metrics_url(self) -> str | None:
        """The project's proxy's Prometheus endpoint (None for bluesky's)."""
        if self.metrics_port is None:
            return None
        return f"http://{LOCALHOST}:{self.metrics_port}/metrics"

    def metrics(self, timeout: float = 10.0) -> dict[str, float]:
        """The project's proxy's metrics, without the ``tiled_writer_sidecar_proxy_`` prefix."""
        if self.metrics_url is None:
            raise ValueError("bluesky-0MQ-proxy serves no metrics")
        response = httpx.get(self.metrics_url, timeout=timeout)
        response.raise_for_status()
        prefix = "tiled_writer_sidecar_proxy_"
        return {k.removeprefix(prefix): v for k, v in parse_metrics(response.text).items()}

    def command(self) -> list[str]:
        addresses = ["--in-address", f"tcp://{self.in_address}", "--out-address", self.out_address]
        if self.kind == "bluesky":
            return [*proxy_command(), *addresses, *self.extra_args]
        extra = ["--metrics-address", f"{LOCALHOST}:{self.metrics_port}"]
        if self.max_buffer_bytes is not None:
            extra += ["--max-buffer-bytes", str(self.max_buffer_bytes)]
        return [*sidecar_proxy_command(), *addresses, *extra, *self.extra_args]

    # -- lifecycle --------------------------------------------------------

    def start(self, *, timeout: float | None = None, probe: bool = True) -> Self:
        """Spawn the proxy and wait until it is ready (see the module doc)."""
        self._process.spawn()
        self._spawned_at = time.monotonic()
        self.wait_ready(timeout, probe=probe)
        return self

    def wait_ready(self, timeout: float | None = None, *, probe: bool = True) -> float:
        """Block until the proxy forwards (probe) or handshakes (no probe).

        Returns seconds since spawn. Raises RuntimeError if the process
        exited, TimeoutError at the deadline.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.startup_timeout)
        if any("curve" in arg or "-mode" in arg for arg in self.extra_args):
            wait_until(self._answers, self._remaining(deadline), interval=0.1, what=f"{self.name}'s metrics")
        elif probe:
            self._probe_until(deadline)
        else:
            self._handshake_until(zmq.PUB, f"tcp://{self.in_address}", deadline)
            self._handshake_until(zmq.SUB, self.out_address, deadline)
        elapsed = time.monotonic() - self._spawned_at
        self.startup_times.append(elapsed)
        return elapsed

    def _answers(self) -> bool:
        self._check_alive()
        try:
            self.metrics(timeout=2)
        except httpx.HTTPError:
            return False
        return True

    def _check_alive(self) -> None:
        if not self._process.running:
            raise RuntimeError(
                f"{self.name} exited with {self._process.returncode};"
                f" log {self.log_path}:\n{self._process.log_tail()}"
            )

    def _remaining(self, deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    def _probe_until(self, deadline: float) -> None:
        nonce = secrets.token_hex(8).encode()
        message = probe_message(nonce)
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, PROBE_PREFIX)
            sub.connect(self.out_address)
            pub = context.socket(zmq.PUB)
            pub.connect(f"tcp://{self.in_address}")

            def came_through() -> bool:
                self._check_alive()
                pub.send(message)
                while sub.poll(timeout=50):
                    if sub.recv() == message:
                        return True
                return False

            wait_until(
                came_through,
                self._remaining(deadline),
                interval=0.0,
                what=f"a probe through {self.name} (log {self.log_path})",
            )
        finally:
            _close(context)

    def _handshake_until(self, socket_type: int, address: str, deadline: float) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            sock = context.socket(socket_type)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sock.connect(address)

            def handshaken() -> bool:
                self._check_alive()
                if monitor.poll(timeout=50):
                    event = recv_monitor_message(monitor)
                    return event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
                return False

            wait_until(
                handshaken,
                self._remaining(deadline),
                interval=0.0,
                what=f"a ZMTP handshake with {self.name} at {address}",
            )
            sock.disable_monitor()
        finally:
            _close(context)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s; return the exit status."""
        return self._process.terminate(timeout)

    def kill(self) -> int | None:
        """SIGKILL at once."""
        return self._process.kill()

    def pause(self) -> None:
        """SIGSTOP: connections stay up, nothing is forwarded."""
        self._process.pause()

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        self._process.resume()

    def restart(self, *, timeout: float | None = None, probe: bool = False) -> Self:
        """Stop and start on the same ports; peers reconnect by themselves."""
        self.stop()
        return self.start(timeout=timeout, probe=probe)

    def close(self) -> None:
        """Stop the proxy if it runs; safe to call more than once."""
        if self._process.running:
            self._process.terminate()
        else:
            self._process.kill()

    def log_tail(self, lines: int = 60) -> str:
        return self._process.log_tail(lines)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"ZmqProxy({self.kind}, in={self.in_address}, out={self.out_address}, {state})"


class SidecarProxy(ZmqProxy):
    """`tiled-writer-sidecar proxy` (the buffering drop-in) as a managed subprocess."""

    def __init__(
        self,
        *,
        in_port: int | None = None,
        out_port: int | None = None,
        log_path: Path | str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        max_buffer_bytes: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(
            in_port=in_port,
            out_port=out_port,
            log_path=log_path,
            startup_timeout=startup_timeout,
            kind="sidecar",
            max_buffer_bytes=max_buffer_bytes,
            extra_args=extra_args,
        )
