"""Typed configuration: defaults < TOML file < command-line flags.

Each TOML section (`[zmq]`, `[tiled]`, `[spool]`, `[metrics]`, `[log]`) maps
to one frozen dataclass. An unknown section or key is a `ConfigError` that
names it; so is a value of the wrong type. Flags override only what was
given on the command line. The Tiled API key never comes from a flag: it is
read from `TILED_API_KEY` or from `api_key_file` (which must not be group-
or world-readable) and is masked whenever the config is printed.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG_PATHS = (Path("/etc/tiled-writer-sidecar/tiled-writer-sidecar.toml"),)
API_KEY_ENV = "TILED_API_KEY"
FSYNC_POLICIES = ("always", "batch", "never")
SERIALIZERS = ("auto", "pickle", "msgpack", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


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
    batch_seconds: float = 1.0
    timeout_seconds: float = 30.0
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0


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
        """Raise ConfigError for values that are well-typed but meaningless."""
        if self.spool.fsync not in FSYNC_POLICIES:
            raise ConfigError(f"[spool] fsync must be one of {FSYNC_POLICIES}, not {self.spool.fsync!r}")
        if self.zmq.serializer not in SERIALIZERS:
            raise ConfigError(f"[zmq] serializer must be one of {SERIALIZERS}, not {self.zmq.serializer!r}")
        if self.log.level.upper() not in LOG_LEVELS:
            raise ConfigError(f"[log] level must be one of {LOG_LEVELS}, not {self.log.level!r}")
        if self.log.format not in LOG_FORMATS:
            raise ConfigError(f"[log] format must be one of {LOG_FORMATS}, not {self.log.format!r}")
        if self.tiled.batch_rows < 1:
            raise ConfigError("[tiled] batch_rows must be at least 1")
        if self.tiled.batch_seconds <= 0:
            raise ConfigError("[tiled] batch_seconds must be positive")
        if self.spool.max_open_runs < 1:
            raise ConfigError("[spool] max_open_runs must be at least 1")
        if self.spool.quarantine_max_bytes < 0:
            raise ConfigError("[spool] quarantine_max_bytes must not be negative")
        if self.spool.segment_bytes < 4096:
            raise ConfigError("[spool] segment_bytes must be at least 4096")
        if "://" not in self.zmq.address:
            raise ConfigError(f"[zmq] address must look like tcp://HOST:PORT, not {self.zmq.address!r}")
        if not self.tiled.uri.startswith(("http://", "https://")):
            raise ConfigError(f"[tiled] uri must start with http:// or https://, not {self.tiled.uri!r}")

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
            return path.read_text().strip() or None
        except OSError as err:
            raise ConfigError(f"cannot read api_key_file {path}: {err.strerror}") from None

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
