"""Typed configuration: defaults < TOML file < command-line flags.

Each TOML section (`[zmq]`, `[tiled]`, `[spool]`, `[metrics]`, `[log]`) maps
to one frozen dataclass. An unknown section or key is a `ConfigError` that
names it; so is a value of the wrong type. Flags override only what was
given on the command line. The Tiled API key never comes from a flag: it is
read from `TILED_API_KEY` or from `api_key_file` (which must not be group-
or world-readable) and is masked whenever the config is printed.
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tiled_writer_sidecar.address import host_port
from tiled_writer_sidecar.errors import ConfigError
from tiled_writer_sidecar.logs import register_secret

DEFAULT_CONFIG_PATHS = (Path("/etc/tiled-writer-sidecar/tiled-writer-sidecar.toml"),)
API_KEY_ENV = "TILED_API_KEY"
FSYNC_POLICIES = ("always", "batch", "never")
#: `[tiled] close_streams`: send TiledWriter's close_stream requests always, or only when they can matter.
CLOSE_STREAMS = ("always", "auto")
SERIALIZERS = ("auto", "pickle", "msgpack", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
#: Query parameters that carry a credential (Tiled reads ``api_key``).
CREDENTIAL_PARAMETERS = ("api_key", "apikey", "token", "access_token")


@dataclass(frozen=True)
class ZmqConfig:
    address: str = "tcp://127.0.0.1:5578"
    serializer: str = "auto"
    prefix: str = ""
    rcvhwm: int = 1_000_000
    max_message_bytes: int = 64 * 2**20
    curve_secret_key_file: str = ""
    curve_server_public_key_file: str = ""


@dataclass(frozen=True)
class TiledConfig:
    uri: str = "http://127.0.0.1:8000"
    api_key_file: str = ""
    batch_rows: int = 10_000
    batch_seconds: float = 0.5
    timeout_seconds: float = 30.0
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    runs_in_flight: int = 1  # 1: runs are created and finished strictly oldest first (docs/design.md)
    close_streams: str = "always"  # "auto": skipped where Tiled has no streaming cache nor webhooks


@dataclass(frozen=True)
class SpoolConfig:
    dir: str = "/var/lib/tiled-writer-sidecar/spool"
    fsync: str = "batch"
    fsync_interval_ms: int = 200
    fsync_records: int = 10_000
    segment_bytes: int = 64 * 2**20
    max_bytes: int = 0
    retention_hours: float = 0.0
    run_timeout_seconds: float = 3600.0
    max_open_runs: int = 256
    quarantine_max_bytes: int = 64 * 2**20


@dataclass(frozen=True)
class MetricsConfig:
    address: str = "127.0.0.1:9478"


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    zmq: ZmqConfig = field(default_factory=ZmqConfig)
    tiled: TiledConfig = field(default_factory=TiledConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def spool_dir(self) -> Path:
        return Path(self.spool.dir)

    def with_overrides(self, **dotted: Any) -> Config:
        """Return a copy with `section_key=value` overrides; `None` means not given."""
        config = self
        for name, value in dotted.items():
            if value is None:
                continue
            section_name, _, key = name.partition("_")
            section = getattr(config, section_name)
            config = replace(config, **{section_name: replace(section, **{key: value})})
        config.check()
        return config

    def check(self) -> None:
        """Raise ConfigError (one line naming the key) for a well-typed but meaningless value.

        The one place values are checked: choices, every number's range
        (`RANGES`), addresses and the Tiled URI (never credentials in it).
        """
        for section, key, choices in CHOICES:
            value = getattr(getattr(self, section), key)
            if (value.upper() if key == "level" else value) not in choices:
                raise ConfigError(f"[{section}] {key} must be one of {choices}, not {value!r}")
        for (section, key), (low, high) in RANGES.items():
            _check_range(section, key, getattr(getattr(self, section), key), low, high)
        if self.tiled.backoff_max_seconds < self.tiled.backoff_initial_seconds:
            raise ConfigError("[tiled] backoff_max_seconds must be at least backoff_initial_seconds")
        if "://" not in self.zmq.address:
            raise ConfigError(f"[zmq] address must look like tcp://HOST:PORT, not {self.zmq.address!r}")
        if self.metrics.address and host_port(self.metrics.address) is None:
            raise ConfigError(
                f'[metrics] address must be HOST:PORT (port 1-65535) or "", not {self.metrics.address!r}'
            )
        _check_tiled_uri(self.tiled.uri)

    def insecure_transport_warning(self) -> str | None:
        """A warning if the API key would cross the network in clear text (http:// to another host)."""
        parts = urlsplit(self.tiled.uri)
        if parts.scheme != "http" or _is_loopback(parts.hostname or ""):
            return None
        return (
            f"[tiled] uri uses http:// to {parts.hostname}, not a loopback address: "
            "the API key and the data cross the network unencrypted; use https://"
        )

    def api_key(self) -> str | None:
        """The Tiled API key from the environment or `api_key_file`; never logged."""
        if key := os.environ.get(API_KEY_ENV):
            return key.strip()
        if not self.tiled.api_key_file:
            return None
        path = _key_path(self.tiled.api_key_file)
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"api_key_file {path} is readable by group or others; run: chmod 600 {path}"
                )
            key = path.read_text().strip() or None
        except OSError as err:
            raise ConfigError(f"cannot read api_key_file {path}: {err.strerror}") from None
        register_secret(key)  # redacted from every log line from now on
        return key

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        """The effective configuration as TOML (no secrets are part of it)."""
        lines: list[str] = []
        for section in fields(self):
            lines.append(f"[{section.name}]")
            for item in fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), item.name)
                lines.append(f"{item.name} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


#: (section, key, allowed values) of every key that takes one of a few words.
CHOICES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("zmq", "serializer", SERIALIZERS),
    ("spool", "fsync", FSYNC_POLICIES),
    ("tiled", "close_streams", CLOSE_STREAMS),
    ("log", "level", LOG_LEVELS),
    ("log", "format", LOG_FORMATS),
)

#: The range of every numeric key: (lowest, highest), inclusive; a lowest of
#: `POSITIVE` (None) means "greater than 0". Upper bounds catch typos (a value
#: in ms where seconds are meant) and keep retry loops and buffers sane.
POSITIVE = None
DAY = 86_400.0
RANGES: dict[tuple[str, str], tuple[float | None, float]] = {
    ("zmq", "rcvhwm"): (0, 2**31 - 1),
    ("zmq", "max_message_bytes"): (1024, 2**31 - 1),
    ("tiled", "batch_rows"): (1, 10_000_000),
    ("tiled", "batch_seconds"): (POSITIVE, 3600.0),
    ("tiled", "timeout_seconds"): (POSITIVE, 3600.0),
    ("tiled", "backoff_initial_seconds"): (0.01, 3600.0),
    ("tiled", "backoff_max_seconds"): (0.01, DAY),
    ("tiled", "runs_in_flight"): (1, 64),
    ("spool", "fsync_interval_ms"): (1, 60_000),
    ("spool", "fsync_records"): (1, 10_000_000),
    ("spool", "segment_bytes"): (4096, 2**40),
    ("spool", "max_bytes"): (0, 2**60),
    ("spool", "retention_hours"): (0, 100 * 365 * 24.0),
    ("spool", "run_timeout_seconds"): (0, 365 * DAY),
    ("spool", "max_open_runs"): (1, 100_000),
    ("spool", "quarantine_max_bytes"): (0, 2**60),
}


def _check_range(section: str, key: str, value: float, low: float | None, high: float) -> None:
    name = f"[{section}] {key}"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {value!r}")
    if low is None:
        if value <= 0:
            raise ConfigError(f"{name} must be positive, not {value!r}")
        low = 0
    elif low == 0 and value < 0:
        raise ConfigError(f"{name} must not be negative, not {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be at least {low:g}, not {value!r}")
    if value > high:
        raise ConfigError(f"{name} must be at most {high:g}, not {value!r}")


def _check_tiled_uri(uri: str) -> None:
    """Refuse a URI that carries credentials (without echoing it: it holds a secret) or no host."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise ConfigError("[tiled] uri is not a valid URL (check the host and port)") from None
    credential = "@" in parts.netloc or any(
        name.lower() in CREDENTIAL_PARAMETERS for name, _ in parse_qsl(parts.query, keep_blank_values=True)
    )
    if credential:
        raise ConfigError(
            "[tiled] uri must not carry credentials (user:pass@ or ?api_key=): they would show in "
            f"process listings and logs; put the API key in {API_KEY_ENV} or [tiled] api_key_file"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"[tiled] uri must start with http:// or https://, not {uri!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_path(value: str) -> Path:
    """`credential:NAME` is NAME in systemd's $CREDENTIALS_DIRECTORY (LoadCredential=)."""
    if not value.startswith("credential:"):
        return Path(value)
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ConfigError(
            f"api_key_file {value!r} needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=); "
            "outside systemd use TILED_API_KEY or a file path"
        )
    return Path(directory) / value.removeprefix("credential:")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _section_from_dict(cls: type[Any], name: str, data: object) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in section [{name}]; known keys: {', '.join(known)}")
        default = known[key].default
        expected: type[Any] = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(
                f"[{name}] {key} must be {expected.__name__}, not {type(value).__name__} ({value!r})"
            )
        values[key] = value
    return cls(**values)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from parsed TOML (or the JSON of `Config.as_dict`)."""
    sections = {f.name: f for f in fields(Config)}
    values: dict[str, Any] = {}
    for name, data in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}] in {source}; known sections: {', '.join(sections)}")
        section_type: type[Any] = type(getattr(Config(), name))
        values[name] = _section_from_dict(section_type, name, data)
    config = Config(**values)
    config.check()
    return config


def load_config(path: Path | None) -> Config:
    """Load `path` (or the first default path that exists, or built-in defaults)."""
    if path is None:
        path = next((p for p in DEFAULT_CONFIG_PATHS if p.exists()), None)
        if path is None:
            return Config()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return config_from_dict(raw, str(path))


__all__ = [
    "Config",
    "LogConfig",
    "MetricsConfig",
    "SpoolConfig",
    "TiledConfig",
    "ZmqConfig",
    "config_from_dict",
    "load_config",
]
