"""``HOST:PORT``, the one parser: `[metrics] address`, ``run --metrics-address`` and ``proxy --metrics-address``.

The string is split at its last colon; the port is 1-65535 in ASCII digits, the host is not empty and
holds no white space nor any of ``/@?#`` (a URL is not an address). Brackets around an IPv6 host
(``[::1]:9478``) are dropped.
"""

from __future__ import annotations


def host_port(address: str) -> tuple[str, int] | None:
    """`address` as ``(host, port)``, or None if it is not ``HOST:PORT`` (the module docstring's rule)."""
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return None
    if any(c.isspace() or c in "/@?#" for c in host):
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


__all__ = ["host_port"]
