"""Issue 7, end to end: the subscription to bluesky-0MQ-proxy over CURVE.

The proxy is bluesky's own ``bluesky-0MQ-proxy`` started with the flags it
has for a bound out socket: ``--out-curve-secret`` (its certificate, secret
and public key) and ``--out-curve-client-keys`` (a directory holding the
public certificates of the subscribers it admits). The sidecar is a CURVE
client: ``[zmq] curve_secret_key_file`` (its own certificate) and
``curve_server_public_key_file`` (the proxy's public certificate). Keys are
made with ``zmq.auth.create_certificates``; nothing is mocked.

Readiness: `Acquisition.wait_subscribers` cannot be used here (its private
SUB has no keys), so probes are published on the RunEngine's own Publisher
until the sidecar counts a message (`wait_receiving`), and the proxy itself
is proven to forward by a private SUB holding an admitted key of its own.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import bluesky.plans as bp
import pytest
import zmq
import zmq.auth
from ophyd.sim import det, motor

from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    probe_message,
    wait_until,
)
from tiled_writer_sidecar.testing._process import ManagedProcess, Service
from tiled_writer_sidecar.testing.acquisition import expected_rows
from tiled_writer_sidecar.testing.ports import LOCALHOST, free_port
from tiled_writer_sidecar.testing.proxy import proxy_command
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream


@dataclass(frozen=True)
class Keys:
    """Certificate files: ``*.key`` public only, ``*.key_secret`` both keys."""

    server_secret: Path  # the proxy's
    server_public: Path
    other_server_public: Path  # some other server's: the wrong key to trust
    sidecar_secret: Path  # admitted (its public key is in `admitted`)
    probe_secret: Path  # admitted: the test's own readiness subscriber
    stranger_secret: Path  # a valid key pair the proxy does not admit
    admitted: Path  # --out-curve-client-keys


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    root = tmp_path / "keys"
    made: dict[str, tuple[Path, Path]] = {}
    for name in ("server", "other-server", "sidecar", "probe", "stranger"):
        directory = root / name
        directory.mkdir(parents=True)
        public, secret = zmq.auth.create_certificates(directory, name)
        made[name] = (Path(public), Path(secret))
    admitted = root / "admitted"
    admitted.mkdir()
    for name in ("sidecar", "probe"):
        (admitted / f"{name}.key").write_bytes(made[name][0].read_bytes())
    return Keys(
        server_secret=made["server"][1],
        server_public=made["server"][0],
        other_server_public=made["other-server"][0],
        sidecar_secret=made["sidecar"][1],
        probe_secret=made["probe"][1],
        stranger_secret=made["stranger"][1],
        admitted=admitted,
    )


class CurveProxy(Service):
    """``bluesky-0MQ-proxy --out-curve-secret ... --out-curve-client-keys ...`` in its own process group.

    Ready once a probe published on `in` comes out of `out` to a SUB that
    authenticates with the admitted `probe` key.
    """

    def __init__(self, keys: Keys, log_path: Path) -> None:
        self.keys = keys
        self.in_port = free_port()
        self.out_port = free_port()
        self.log_path = log_path
        self.process = ManagedProcess(
            [
                *proxy_command(),
                "--in-address",
                f"tcp://{self.in_address}",
                "--out-address",
                self.out_address,
                "--out-curve-secret",
                str(keys.server_secret),
                "--out-curve-client-keys",
                str(keys.admitted),
            ],
            log_path=log_path,
        )

    @property
    def in_address(self) -> str:
        return f"{LOCALHOST}:{self.in_port}"

    @property
    def out_address(self) -> str:
        return f"tcp://{LOCALHOST}:{self.out_port}"

    def start(self, timeout: float = 30.0) -> Self:
        self.process.spawn()
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            sub = context.socket(zmq.SUB)
            public, secret = zmq.auth.load_certificate(self.keys.probe_secret)
            assert secret is not None
            sub.curve_publickey = public
            sub.curve_secretkey = secret
            sub.curve_serverkey = zmq.auth.load_certificate(self.keys.server_public)[0]
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(self.out_address)
            pub = context.socket(zmq.PUB)
            pub.connect(f"tcp://{self.in_address}")
            message = probe_message(secrets.token_hex(8).encode())

            def came_through() -> bool:
                if not self.process.running:
                    raise RuntimeError(f"bluesky-0MQ-proxy exited:\n{self.log_tail()}")
                pub.send(message)
                while sub.poll(timeout=50):
                    if sub.recv() == message:
                        return True
                return False

            wait_until(came_through, timeout, interval=0.0, what="a probe through the CURVE proxy")
        finally:
            context.destroy(linger=0)
        return self

    def close(self) -> None:
        self.process.terminate(5)

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines)


@pytest.fixture
def proxy(keys: Keys, tmp_path: Path) -> Iterator[CurveProxy]:
    """The CURVE proxy (named like conftest's `proxy`: `acquisition` publishes to it, its log is
    attached to failure reports)."""
    with CurveProxy(keys, tmp_path / "curve-proxy.log") as running:
        yield running


def curve_sidecar(
    directory: Path,
    proxy: CurveProxy,
    tiled: TiledContainer,
    *,
    secret: Path | None,
    server_public: Path | None,
) -> SidecarProcess:
    zmq_settings: dict[str, Any] = {}
    if secret is not None:
        zmq_settings["curve_secret_key_file"] = str(secret)
    if server_public is not None:
        zmq_settings["curve_server_public_key_file"] = str(server_public)
    return SidecarProcess(
        directory,
        zmq_address=proxy.out_address,
        tiled_uri=tiled.uri,
        api_key=tiled.api_key,
        settings={"zmq": zmq_settings},
    )


def wait_receiving(acquisition: Acquisition, sidecar: SidecarProcess, timeout: float = 60.0) -> None:
    """Publish probes on the RunEngine's Publisher until the sidecar has counted one."""
    publisher = acquisition.publisher
    assert publisher is not None
    message = probe_message(secrets.token_hex(8).encode())

    def counted() -> bool:
        publisher.send_raw(message)
        return sidecar.messages_seen() > 0

    wait_until(counted, timeout, interval=0.1, what="the sidecar to receive a probe over CURVE")


def assert_in_tiled(
    tiled: TiledContainer, acquisition: Acquisition, sidecar: SidecarProcess, uid: str
) -> None:
    status = sidecar.wait_drained([uid])
    (run,) = [r for r in status["runs"] if r["uid"] == uid]
    assert run["state"] == "uploaded" and run["gaps"] == {}, run
    expected = expected_rows(acquisition.documents, run_uid=uid)
    assert expected
    assert frame_rows(read_stream(tiled.client(), uid)) == expected


def test_a_run_arrives_in_tiled_through_a_curve_encrypted_authenticating_proxy(
    tiled_container: TiledContainer, proxy: CurveProxy, acquisition: Acquisition, keys: Keys, tmp_path: Path
) -> None:
    """A sidecar with its admitted key pair and the proxy's public key: a scan arrives row for row."""
    with curve_sidecar(
        tmp_path / "sidecar",
        proxy,
        tiled_container,
        secret=keys.sidecar_secret,
        server_public=keys.server_public,
    ) as sidecar:
        wait_receiving(acquisition, sidecar)
        (uid,) = acquisition.run(bp.scan([det], motor, -1, 1, 9))
        assert_in_tiled(tiled_container, acquisition, sidecar, uid)


#: Sidecar configurations the proxy must not serve: (name, client secret, trusted server public).
MISCONFIGURED = (
    ("wrong-server-key", "sidecar_secret", "other_server_public"),
    ("client-key-not-admitted", "stranger_secret", "server_public"),
    ("no-curve", None, None),
)


def misconfigured_sidecars(
    keys: Keys, proxy: CurveProxy, tiled: TiledContainer, tmp_path: Path
) -> dict[str, SidecarProcess]:
    return {
        name: curve_sidecar(
            tmp_path / name,
            proxy,
            tiled,
            secret=getattr(keys, secret) if secret else None,
            server_public=getattr(keys, public) if public else None,
        )
        for name, secret, public in MISCONFIGURED
    }


def test_sidecars_with_a_wrong_server_key_an_unadmitted_key_or_no_curve_receive_nothing(
    tiled_container: TiledContainer, proxy: CurveProxy, acquisition: Acquisition, keys: Keys, tmp_path: Path
) -> None:
    """Three misconfigured sidecars run next to a correct one from before its start to after a
    whole run: the correct one uploads the run, each misconfigured one has received 0 messages."""
    wrong = misconfigured_sidecars(keys, proxy, tiled_container, tmp_path)
    try:
        for sidecar in wrong.values():
            sidecar.start()
        with curve_sidecar(
            tmp_path / "sidecar",
            proxy,
            tiled_container,
            secret=keys.sidecar_secret,
            server_public=keys.server_public,
        ) as good:
            wait_receiving(acquisition, good)
            (uid,) = acquisition.run(bp.count([det], 5))
            assert_in_tiled(tiled_container, acquisition, good, uid)
            for name, sidecar in wrong.items():
                health = sidecar.health()
                assert health["receiver"]["messages"] == 0, name
                assert sidecar.status()["runs"] == [], name
                assert sidecar.process.running, name
    finally:
        for sidecar in wrong.values():
            sidecar.terminate()


def _says_handshake_failed(log: str) -> bool:
    return any(
        (" WARNING " in line or " ERROR " in line)
        and ("handshake" in line.lower() or "curve" in line.lower())
        for line in log.splitlines()
    )


def test_a_refused_curve_handshake_is_reported_in_the_log(
    tiled_container: TiledContainer, proxy: CurveProxy, keys: Keys, tmp_path: Path
) -> None:
    """Each misconfigured sidecar logs a warning or error naming the failed CURVE handshake."""
    wrong = misconfigured_sidecars(keys, proxy, tiled_container, tmp_path)
    try:
        for sidecar in wrong.values():
            sidecar.start()
        wait_until(
            lambda: all(_says_handshake_failed(s.log_tail(1000)) for s in wrong.values()),
            30,
            interval=0.5,
            what="every misconfigured sidecar to log its failed CURVE handshake",
        )
    finally:
        for sidecar in wrong.values():
            sidecar.terminate()
