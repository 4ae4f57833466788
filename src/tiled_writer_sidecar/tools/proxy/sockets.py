"""The proxy's two sockets as bluesky-0MQ-proxy sets them up: addresses, modes, CURVE, allowlists.

Each side is a `SideOptions`: ``bind`` (default) or ``connect``; CURVE as a
server (``--X-curve-secret``, ``--X-curve-client-keys``, ``--X-curve-allow``)
in bind mode, or as a client (``--X-client-secret``, ``--X-server-public``)
in connect mode, the same pairings bluesky's proxy enforces, with keys in
its format (``zmq.auth`` certificate files and a folder of public ones).

Who may connect is 0MQ's ZAP, answered by one authenticator thread for
both sides (a context has one ZAP endpoint): each bound side has its own
ZAP domain (``in`` / ``out``) and policy, so an address allowlist on
``--in-curve-allow`` restricts publishers without touching subscribers.
Unlike bluesky's proxy, an allowlist works without CURVE too (the NULL
mechanism, by address only) and a `ConfigError` names a bad flag in one line.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from tiled_writer_sidecar.errors import ConfigError, SidecarError


class AddressInUse(SidecarError):
    """The address is already bound by another process (exit 1)."""


@dataclass(frozen=True)
class SideOptions:
    """One side's flags (``role`` is ``in`` or ``out``), as bluesky-0MQ-proxy names them."""

    role: str
    address: str | None = None
    mode: str = "bind"
    curve_secret: str | None = None  # server: its certificate (both keys)
    curve_client_keys: str | None = None  # server: folder of admitted public certificates
    curve_allow: tuple[str, ...] | None = None  # server: IP addresses admitted
    client_secret: str | None = None  # client: its certificate
    server_public: str | None = None  # client: the server's public certificate

    @property
    def binds(self) -> bool:
        return self.mode == "bind"

    def check(self) -> None:
        """bluesky's rules for which CURVE flags go with which mode; ConfigError in one line."""
        flag = f"--{self.role}"
        if self.mode not in ("bind", "connect"):
            raise ConfigError(f"{flag}-mode must be bind or connect, not {self.mode!r}")
        if self.binds and (self.client_secret or self.server_public):
            raise ConfigError(f"{flag}-client-secret / {flag}-server-public need {flag}-mode connect")
        if not self.binds and (self.curve_secret or self.curve_client_keys or self.curve_allow is not None):
            raise ConfigError(
                f"{flag}-curve-secret / {flag}-curve-client-keys / {flag}-curve-allow need {flag}-mode bind"
            )
        if self.curve_client_keys and not self.curve_secret:
            raise ConfigError(f"{flag}-curve-client-keys needs {flag}-curve-secret")
        if bool(self.client_secret) != bool(self.server_public):
            raise ConfigError(f"{flag}-client-secret and {flag}-server-public go together")
        if not self.binds and self.address is None:
            raise ConfigError(f"{flag}-mode connect needs {flag}-address")


def normalize_address(address: str | None) -> str:
    """An address as bluesky's Proxy reads it: a 0MQ endpoint (``tcp://*`` for none)."""
    if address is None or address == "":
        return "tcp://*"
    address = address.strip()
    if address.isdigit():
        return f"tcp://0.0.0.0:{address}"
    if "://" in address:
        return address
    return f"tcp://{address}"


def _wants_random_port(endpoint: str) -> bool:
    return endpoint.startswith("tcp://") and ":" not in endpoint[len("tcp://") :]


def load_keys(path: str, flag: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """A zmq.auth certificate file (bluesky's key format); ConfigError naming `flag` otherwise."""
    try:
        public, secret_key = zmq.auth.load_certificate(Path(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{flag} {path}: cannot load a CURVE certificate: {err}") from None
    if secret and secret_key is None:
        raise ConfigError(f"{flag} {path}: holds no secret key (use the *.key_secret file)")
    return public, secret_key


class Gatekeeper:
    """The ZAP authenticator: one policy (addresses, CURVE keys) per bound side's domain."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        self._policies: dict[str, tuple[set[str], bool]] = {}
        self._auth = _DomainAuthenticator(context, self._policies)
        self._started = False

    def admit(self, sock: zmq.Socket[Any], side: SideOptions) -> None:
        """Set ZAP up for a bound `side` that has CURVE or an allowlist; nothing otherwise."""
        if not side.curve_secret and side.curve_allow is None:
            return
        allow = set(side.curve_allow or ())
        allow_any_key = True
        if side.curve_secret:
            if side.curve_client_keys:
                keys = Path(side.curve_client_keys)
                if not keys.is_dir():
                    raise ConfigError(f"--{side.role}-curve-client-keys {keys}: not a directory")
                self._auth.configure_curve(domain=side.role, location=str(keys))
                allow_any_key = False
            public, secret = load_keys(side.curve_secret, f"--{side.role}-curve-secret", secret=True)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret or b"")
            sock.setsockopt(zmq.CURVE_SERVER, 1)
        self._policies[side.role] = (allow, allow_any_key)
        sock.setsockopt(zmq.ZAP_DOMAIN, side.role.encode())
        if not self._started:
            self._auth.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._auth.stop()
            self._started = False


class _DomainAuthenticator(ThreadAuthenticator):
    """pyzmq's authenticator with the address allowlist and 'any key' switch chosen per ZAP domain."""

    def __init__(self, context: zmq.Context[Any], policies: dict[str, tuple[set[str], bool]]) -> None:
        super().__init__(context)
        self._domain_policies = policies

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        domain = msg[2].decode(errors="replace") if len(msg) > 2 else ""
        allowed, any_key = self._domain_policies.get(domain, (set(), False))
        self._allowed, self.allow_any = allowed, any_key
        await super().handle_zap_message(msg)


def apply_client(sock: zmq.Socket[Any], side: SideOptions) -> None:
    """CURVE client keys for a connecting `side` (``--X-client-secret``, ``--X-server-public``)."""
    if not side.client_secret or not side.server_public:
        return
    public, secret = load_keys(side.client_secret, f"--{side.role}-client-secret", secret=True)
    server, _ = load_keys(side.server_public, f"--{side.role}-server-public", secret=False)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret or b"")
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)


def attach(sock: zmq.Socket[Any], side: SideOptions) -> str:
    """Bind or connect `sock` like bluesky's Proxy; return the endpoint really used.

    Raises `AddressInUse` (exit 1) or `ConfigError` (exit 2) with one line.
    """
    endpoint = normalize_address(side.address)
    what = f"--{side.role}-address {side.address!r} ({endpoint})"
    try:
        if not side.binds:
            sock.connect(endpoint)
            return endpoint
        if _wants_random_port(endpoint):
            sock.bind_to_random_port(endpoint)
        else:
            sock.bind(endpoint)
    except zmq.ZMQError as err:
        if err.errno == errno.EADDRINUSE:
            raise AddressInUse(f"{what}: address already in use") from None
        if err.errno == errno.EACCES:
            raise SidecarError(f"{what}: permission denied") from None
        raise ConfigError(f"{what}: cannot {side.mode}: {err.strerror}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--{side.role}-address {side.address!r}: {err}") from None
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode(errors="replace")  # type: ignore[union-attr]
