"""Optional CURVE encryption for the subscription to bluesky-0MQ-proxy.

Matches the proxy's ``--out-curve-secret`` server mode: the sidecar is a
CURVE client with its own key pair (``curve_secret_key_file``, a zmq
certificate file with both keys) and the proxy's public key
(``curve_server_public_key_file``).
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth

from tiled_writer_sidecar.config import ZmqConfig
from tiled_writer_sidecar.errors import ConfigError


def apply_client_curve(socket: zmq.Socket[bytes], config: ZmqConfig) -> None:
    if not config.curve_server_public_key_file:
        raise ConfigError("[zmq] curve_secret_key_file needs curve_server_public_key_file too")
    try:
        public, secret = zmq.auth.load_certificate(Path(config.curve_secret_key_file))
        server_public, _ = zmq.auth.load_certificate(Path(config.curve_server_public_key_file))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load CURVE keys: {err}") from None
    if secret is None:
        raise ConfigError(f"{config.curve_secret_key_file} holds no secret key")
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
    socket.setsockopt(zmq.CURVE_SERVERKEY, server_public)
