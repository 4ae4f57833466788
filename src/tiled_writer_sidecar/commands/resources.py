"""The files a facility installs besides the package: systemd units, example config, alert rules, dashboard.

They live in the repository (``systemd/``, ``conf/``) and are copied into the
wheel under ``tiled_writer_sidecar/data/`` (pyproject.toml's force-include), so
``tiled-writer-sidecar print-unit`` and ``print-config`` print them from any
install: the wheel's copy, or the checkout's files in an editable install.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from tiled_writer_sidecar.errors import ConfigError

#: `print-unit NAME` -> the unit file.
UNITS = {
    "sidecar": "tiled-writer-sidecar.service",
    "template": "tiled-writer-sidecar@.service",
    "proxy": "tiled-writer-sidecar-proxy.service",
    "bluesky-proxy": "bluesky-0mq-proxy.service",
}
#: `print-config NAME` -> the file (path under data/, path in the checkout).
CONFIGS = {
    "sidecar": ("tiled-writer-sidecar.toml", "conf/tiled-writer-sidecar.toml"),
    "prometheus": (
        "prometheus/tiled-writer-sidecar.rules.yml",
        "conf/prometheus/tiled-writer-sidecar.rules.yml",
    ),
    "grafana": ("grafana/tiled-writer-sidecar.json", "conf/grafana/tiled-writer-sidecar.json"),
}
_CHECKOUT = Path(__file__).resolve().parents[3]


def _read(packaged: str, in_checkout: str) -> str:
    resource = files(__package__).joinpath("data", *packaged.split("/"))
    if resource.is_file():
        return resource.read_text(encoding="utf-8")
    local = _CHECKOUT / in_checkout
    if local.is_file():  # an editable install: the checkout's own file
        return local.read_text(encoding="utf-8")
    raise ConfigError(f"{packaged} is not part of this installation (reinstall the package)")


def unit_text(name: str) -> str:
    """The text of systemd unit `name` (a key of `UNITS`)."""
    if name not in UNITS:
        raise ConfigError(f"unknown unit {name!r}; one of: {', '.join(UNITS)}")
    return _read(UNITS[name], f"systemd/{UNITS[name]}")


def config_text(name: str = "sidecar") -> str:
    """The text of example file `name` (a key of `CONFIGS`)."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown config {name!r}; one of: {', '.join(CONFIGS)}")
    return _read(*CONFIGS[name])
