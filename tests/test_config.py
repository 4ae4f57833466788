"""Configuration: defaults < TOML file < flags; errors name what is wrong; the key stays secret.

Also pins the documented example `conf/tiled-writer-sidecar.toml` to the
code's defaults (so the documentation cannot drift), and runs the real
console script for `run --check-config`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tiled_writer_sidecar import config as config_module
from tiled_writer_sidecar.config import Config, config_from_dict, load_config
from tiled_writer_sidecar.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "conf" / "tiled-writer-sidecar.toml"
CONSOLE_SCRIPT = Path(sys.executable).parent / "tiled-writer-sidecar"
SECRET = "some-secret-7f3a9c"

#: A valid value different from the default for every key of every section.
#: test_every_key_has_a_non_default_example keeps this complete.
NON_DEFAULTS: dict[str, dict[str, Any]] = {
    "zmq": {
        "address": "tcp://10.0.0.5:6000",
        "serializer": "msgpack",
        "prefix": "beamline-x",
        "rcvhwm": 5000,
        "max_message_bytes": 1024,
        "curve_secret_key_file": "/etc/keys/client.key_secret",
        "curve_server_public_key_file": "/etc/keys/server.key",
    },
    "tiled": {
        "uri": "https://tiled.example.org",
        "api_key_file": "/etc/tiled-writer-sidecar/key",
        "batch_rows": 7,
        "batch_seconds": 0.25,
        "timeout_seconds": 5.0,
        "backoff_initial_seconds": 0.1,
        "backoff_max_seconds": 9.0,
        "runs_in_flight": 2,
        "close_streams": "auto",
    },
    "spool": {
        "dir": "/data/spool",
        "fsync": "always",
        "fsync_interval_ms": 50,
        "fsync_records": 10,
        "segment_bytes": 8192,
        "max_bytes": 2**30,
        "retention_hours": 24.0,
        "run_timeout_seconds": 60.0,
        "max_open_runs": 16,
        "quarantine_max_bytes": 2**20,
    },
    "metrics": {"address": "0.0.0.0:9999"},
    "log": {"level": "DEBUG", "format": "json"},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def write_key_file(path: Path, content: str, mode: int) -> Path:
    path.write_text(content)
    path.chmod(mode)
    return path


@pytest.fixture(autouse=True)
def no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not see a TILED_API_KEY of the developer's shell."""
    monkeypatch.delenv("TILED_API_KEY", raising=False)


# ------------------------------------------------------------------ loading


def test_no_file_anywhere_gives_the_builtin_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config and without /etc/... the daemon runs on the defaults of config.py."""
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATHS", (tmp_path / "absent.toml",))
    config = load_config(None)
    assert config == Config()
    assert config.metrics.address == "127.0.0.1:9478"  # the contract's /metrics default
    assert config.spool_dir == Path("/var/lib/tiled-writer-sidecar/spool")


def test_default_path_is_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config the first existing default path (the /etc file) is loaded."""
    path = write_config(tmp_path / "etc.toml", {"tiled": {"uri": "https://tiled.example.org"}})
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATHS", (tmp_path / "absent.toml", path))
    assert load_config(None).tiled.uri == "https://tiled.example.org"


def test_every_key_has_a_non_default_example() -> None:
    """NON_DEFAULTS covers every key of every section, each with a value that differs from the default."""
    defaults = Config().as_dict()
    assert {s: set(keys) for s, keys in NON_DEFAULTS.items()} == {
        s: set(keys) for s, keys in defaults.items()
    }
    for section, values in NON_DEFAULTS.items():
        for key, value in values.items():
            assert value != defaults[section][key], f"[{section}] {key}"


@pytest.mark.parametrize("section", sorted(NON_DEFAULTS))
def test_every_key_of_a_section_is_read_from_the_file(tmp_path: Path, section: str) -> None:
    """Each key set in the file arrives in the Config; the other sections keep their defaults."""
    path = write_config(tmp_path / "c.toml", {section: NON_DEFAULTS[section]})
    config = load_config(path)
    loaded = config.as_dict()
    assert loaded[section] == NON_DEFAULTS[section]
    for other in loaded.keys() - {section}:
        assert loaded[other] == Config().as_dict()[other]


def test_a_partial_section_keeps_the_defaults_of_the_keys_not_given(tmp_path: Path) -> None:
    """Setting one key of [spool] does not reset the others."""
    config = load_config(write_config(tmp_path / "c.toml", {"spool": {"fsync": "always"}}))
    assert config.spool == dataclasses.replace(Config().spool, fsync="always")


def test_integer_is_accepted_where_a_float_is_expected(tmp_path: Path) -> None:
    """`batch_seconds = 2` is a float 2.0, not a type error."""
    config = load_config(write_config(tmp_path / "c.toml", {"tiled": {"batch_seconds": 2}}))
    assert config.tiled.batch_seconds == 2.0
    assert isinstance(config.tiled.batch_seconds, float)


def test_to_toml_round_trips_to_an_equal_config() -> None:
    """What --check-config prints can be saved and loaded back as the same configuration."""
    config = config_from_dict(NON_DEFAULTS)
    assert config_from_dict(tomllib.loads(config.to_toml())) == config


# ------------------------------------------------------------------- errors


def test_unknown_section_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", {"tiledd": {"uri": "http://x"}})
    with pytest.raises(ConfigError, match=r"unknown section \[tiledd\]") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert info.value.exit_code == 2


def test_unknown_key_is_an_error_naming_the_key_and_its_section(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", {"zmq": {"adress": "tcp://127.0.0.1:5578"}})
    with pytest.raises(ConfigError, match=r"unknown key 'adress' in section \[zmq\]") as info:
        load_config(path)
    assert "address" in str(info.value)  # the known keys are listed, so the typo is obvious


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("tiled", "batch_rows", "many", "int"),
        ("zmq", "rcvhwm", True, "int"),  # a bool is not an int here, though Python says it is
        ("tiled", "batch_seconds", "1s", "float"),
        ("spool", "dir", 17, "str"),
    ],
)
def test_wrong_type_is_an_error_naming_key_and_expected_type(
    tmp_path: Path, section: str, key: str, value: Any, expected: str
) -> None:
    path = tmp_path / "c.toml"
    literal = "true" if value is True else _toml_value(value)
    path.write_text(f"[{section}]\n{key} = {literal}\n")
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key} must be {expected}"):
        load_config(path)


def test_section_that_is_not_a_table_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('zmq = "tcp://127.0.0.1:5578"\n')
    with pytest.raises(ConfigError, match=r"\[zmq\] must be a table"):
        load_config(path)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"spool": {"fsync": "sometimes"}}, r"\[spool\] fsync must be one of"),
        ({"zmq": {"serializer": "yaml"}}, r"\[zmq\] serializer must be one of"),
        ({"tiled": {"batch_rows": 0}}, r"\[tiled\] batch_rows must be at least 1"),
        ({"tiled": {"batch_seconds": 0.0}}, r"\[tiled\] batch_seconds must be positive"),
        ({"spool": {"segment_bytes": 100}}, r"\[spool\] segment_bytes must be at least"),
        ({"zmq": {"address": "127.0.0.1:5578"}}, r"\[zmq\] address must look like"),
        ({"tiled": {"uri": "tiled.example.org"}}, r"\[tiled\] uri must start with"),
        ({"log": {"level": "LOUD"}}, r"\[log\] level must be one of"),
        ({"log": {"format": "xml"}}, r"\[log\] format must be one of"),
    ],
)
def test_meaningless_values_are_errors_naming_the_key(
    tmp_path: Path, sections: dict[str, dict[str, Any]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path / "c.toml", sections))


@pytest.mark.parametrize(("section", "key"), sorted(config_module.RANGES))
def test_every_numeric_key_is_range_checked(tmp_path: Path, section: str, key: str) -> None:
    """Below its lowest or above its highest value, every numeric key is a ConfigError naming it."""
    low, high = config_module.RANGES[(section, key)]
    default = getattr(getattr(Config(), section), key)
    kind = type(default)
    below = kind(-1 if low is None or low == 0 else low / 2 - 1)
    for bad in (below, kind(high * 2 + 1)):
        with pytest.raises(ConfigError, match=rf"^\[{section}\] {key} must (not )?be "):
            config_from_dict({section: {key: bad}})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5])
def test_a_backoff_that_would_spin_is_refused(value: float) -> None:
    """NaN, infinity or a negative backoff (a hot retry loop) is refused."""
    with pytest.raises(ConfigError, match=r"\[tiled\] backoff_initial_seconds must be"):
        config_from_dict({"tiled": {"backoff_initial_seconds": value}})


def test_backoff_max_below_initial_is_refused() -> None:
    with pytest.raises(ConfigError, match="backoff_max_seconds must be at least backoff_initial_seconds"):
        config_from_dict({"tiled": {"backoff_initial_seconds": 5.0, "backoff_max_seconds": 1.0}})


@pytest.mark.parametrize("address", ["x", "127.0.0.1", ":9478", "127.0.0.1:0", "127.0.0.1:70000", "h:port"])
def test_a_metrics_address_that_is_not_host_port_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match=r"\[metrics\] address must be HOST:PORT"):
        config_from_dict({"metrics": {"address": address}})


def test_an_empty_metrics_address_turns_the_endpoint_off() -> None:
    assert config_from_dict({"metrics": {"address": ""}}).metrics.address == ""


@pytest.mark.parametrize(
    "uri",
    [
        f"https://user:{SECRET}@tiled.example.org",
        f"https://{SECRET}@tiled.example.org/api",
        f"https://tiled.example.org/?api_key={SECRET}",
        f"http://127.0.0.1:8000/api/v1/metadata/x?API_KEY={SECRET}",
        f"tiled.example.org/?api_key={SECRET}",
    ],
)
def test_a_tiled_uri_with_credentials_is_refused_without_echoing_them(uri: str) -> None:
    """The one line names where the key belongs and never repeats the secret."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"tiled": {"uri": uri}})
    message = str(info.value)
    assert "TILED_API_KEY" in message and "api_key_file" in message
    assert SECRET not in message and "\n" not in message


@pytest.mark.parametrize(
    ("uri", "warned"),
    [
        ("http://127.0.0.1:8000", False),
        ("http://localhost:8000/api", False),
        ("http://[::1]:8000", False),
        ("https://tiled.example.org", False),
        ("http://tiled.example.org", True),
        ("http://10.0.0.5:8000", True),
    ],
)
def test_plain_http_to_another_host_is_warned_about(uri: str, warned: bool) -> None:
    warning = config_from_dict({"tiled": {"uri": uri}}).insecure_transport_warning()
    assert (warning is not None) == warned
    if warning:
        assert "https://" in warning


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[zmq\naddress = \n")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_explicit_file_is_a_config_error(tmp_path: Path) -> None:
    """--config FILE that does not exist is an error, not a silent fall back to defaults."""
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


# ---------------------------------------------------------------- overrides


def test_flags_override_only_what_was_given(tmp_path: Path) -> None:
    """`None` (a flag not given) keeps the file's value; a given flag replaces just its key."""
    path = write_config(
        tmp_path / "c.toml",
        {
            "zmq": {"address": "tcp://10.0.0.5:6000", "rcvhwm": 5000},
            "tiled": {"uri": "https://tiled.example.org", "batch_rows": 7},
            "spool": {"dir": "/data/spool", "fsync": "always"},
        },
    )
    from_file = load_config(path)
    config = from_file.with_overrides(spool_dir=str(tmp_path / "spool"), zmq_address=None, tiled_uri=None)
    assert config.spool.dir == str(tmp_path / "spool")
    assert config.spool.fsync == "always"  # same section, not given: kept
    assert config.zmq == from_file.zmq
    assert config.tiled == from_file.tiled


def test_flags_override_the_file_values(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", {"zmq": {"address": "tcp://10.0.0.5:6000"}})
    config = load_config(path).with_overrides(
        zmq_address="tcp://127.0.0.1:7000", tiled_uri="http://127.0.0.1:9000"
    )
    assert config.zmq.address == "tcp://127.0.0.1:7000"
    assert config.tiled.uri == "http://127.0.0.1:9000"


def test_an_invalid_flag_value_is_checked_like_a_file_value() -> None:
    with pytest.raises(ConfigError, match=r"\[tiled\] uri must start with"):
        Config().with_overrides(tiled_uri="localhost:8000")


# ------------------------------------------------------------------ API key


def test_api_key_is_none_without_env_or_file() -> None:
    assert Config().api_key() is None


def test_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILED_API_KEY", f"  {SECRET}\n")
    assert Config().api_key() == SECRET


def test_api_key_comes_from_a_0600_file(tmp_path: Path) -> None:
    key_file = write_key_file(tmp_path / "key", f"{SECRET}\n", 0o600)
    config = Config().with_overrides(tiled_api_key_file=str(key_file))
    assert config.api_key() == SECRET


def test_a_0400_key_file_is_accepted(tmp_path: Path) -> None:
    """systemd's LoadCredential= exposes credentials with mode 0400."""
    key_file = write_key_file(tmp_path / "key", SECRET, 0o400)
    assert Config().with_overrides(tiled_api_key_file=str(key_file)).api_key() == SECRET


def test_the_environment_wins_over_the_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = write_key_file(tmp_path / "key", "from-file", 0o600)
    monkeypatch.setenv("TILED_API_KEY", "from-env")
    assert Config().with_overrides(tiled_api_key_file=str(key_file)).api_key() == "from-env"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_file_readable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    """The refusal says how to fix it and never shows the key."""
    key_file = write_key_file(tmp_path / "key", SECRET, mode)
    config = Config().with_overrides(tiled_api_key_file=str(key_file))
    with pytest.raises(ConfigError, match="readable by group or others") as info:
        config.api_key()
    assert f"chmod 600 {key_file}" in str(info.value)
    assert SECRET not in str(info.value)


def test_a_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    config = Config().with_overrides(tiled_api_key_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="cannot read api_key_file"):
        config.api_key()


def test_the_key_is_not_part_of_the_printed_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """to_toml (what --check-config prints) names the key file but never the key."""
    key_file = write_key_file(tmp_path / "key", SECRET, 0o600)
    monkeypatch.setenv("TILED_API_KEY", SECRET)
    config = Config().with_overrides(tiled_api_key_file=str(key_file))
    assert config.api_key() == SECRET
    assert SECRET not in config.to_toml()
    assert SECRET not in repr(config)
    assert str(key_file) in config.to_toml()


# --------------------------------------------------------- the example file


def test_example_config_loads_and_equals_the_defaults() -> None:
    """conf/tiled-writer-sidecar.toml documents exactly the defaults of config.py."""
    assert load_config(EXAMPLE) == Config()


def test_example_config_shows_every_key_of_every_section() -> None:
    """A key added to config.py must be added (and documented) in the example too."""
    raw = tomllib.loads(EXAMPLE.read_text())
    expected = {section: set(values) for section, values in Config().as_dict().items()}
    assert {section: set(values) for section, values in raw.items()} == expected


def test_every_key_in_the_example_has_a_comment_above_it() -> None:
    lines = EXAMPLE.read_text().splitlines()
    undocumented = [
        line
        for previous, line in itertools.pairwise(lines)
        if "=" in line and not line.startswith("#") and not previous.startswith("#")
    ]
    assert undocumented == []


# ----------------------------------------------------- the real command line


def run_cli(*args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as an operator would."""
    env = {k: v for k, v in os.environ.items() if k not in ("TILED_API_KEY", "NOTIFY_SOCKET")}
    if api_key is not None:
        env["TILED_API_KEY"] = api_key
    assert CONSOLE_SCRIPT.exists(), f"console script not installed: {CONSOLE_SCRIPT}"
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.process
def test_check_config_prints_the_effective_config_and_masks_the_key(tmp_path: Path) -> None:
    """`run --check-config` exits 0 and prints file values and flag overrides, never the key."""
    path = write_config(
        tmp_path / "c.toml",
        {"tiled": {"uri": "https://tiled.example.org", "batch_rows": 7}, "log": {"level": "DEBUG"}},
    )
    spool = str(tmp_path / "spool")
    result = run_cli("run", "--check-config", "--config", str(path), "--spool-dir", spool, api_key=SECRET)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr
    printed = config_from_dict(tomllib.loads(result.stdout), "stdout")
    assert printed == load_config(path).with_overrides(spool_dir=spool)
    assert "API key: set (masked)" in result.stdout
    assert not (tmp_path / "spool").exists()  # checking the config starts nothing


@pytest.mark.process
def test_check_config_masks_a_key_read_from_a_file(tmp_path: Path) -> None:
    key_file = write_key_file(tmp_path / "key", SECRET, 0o600)
    path = write_config(tmp_path / "c.toml", {"tiled": {"api_key_file": str(key_file)}})
    result = run_cli("run", "--check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "API key: set (masked)" in result.stdout


@pytest.mark.process
def test_check_config_says_when_no_key_is_set(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", {"tiled": {"uri": "http://127.0.0.1:8000"}})
    result = run_cli("run", "--check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "API key: not set" in result.stdout


@pytest.mark.process
@pytest.mark.parametrize(
    ("sections", "reason"),
    [
        ({"zmq": {"adress": "tcp://127.0.0.1:5578"}}, "unknown key 'adress'"),
        ({"spool": {"fsync": "sometimes"}}, "fsync must be one of"),
        ({"tiled": {"batch_rows": "many"}}, "batch_rows must be int"),
        ({"log": {"level": "LOUD"}}, "level must be one of"),
    ],
)
def test_check_config_of_a_bad_config_exits_2_with_one_line(
    tmp_path: Path, sections: dict[str, dict[str, Any]], reason: str
) -> None:
    result = run_cli("run", "--check-config", "--config", str(write_config(tmp_path / "c.toml", sections)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert reason in lines[0]


@pytest.mark.process
@pytest.mark.parametrize(
    ("sections", "reason"),
    [
        ({"metrics": {"address": "x"}}, "[metrics] address must be HOST:PORT"),
        ({"tiled": {"backoff_initial_seconds": -1.0}}, "[tiled] backoff_initial_seconds must be"),
        ({"tiled": {"uri": f"https://u:{SECRET}@tiled.example.org"}}, "must not carry credentials"),
    ],
)
def test_check_config_of_a_bad_value_exits_2_with_one_line_and_no_secret(
    tmp_path: Path, sections: dict[str, dict[str, Any]], reason: str
) -> None:
    """Through the real console script: exit 2, one line, no traceback, the secret not repeated."""
    result = run_cli("run", "--check-config", "--config", str(write_config(tmp_path / "c.toml", sections)))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [result.stderr.strip()]
    assert reason in result.stderr
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.process
def test_check_config_refuses_a_world_readable_key_file_with_exit_2(tmp_path: Path) -> None:
    key_file = write_key_file(tmp_path / "key", SECRET, 0o644)
    path = write_config(tmp_path / "c.toml", {"tiled": {"api_key_file": str(key_file)}})
    result = run_cli("run", "--check-config", "--config", str(path))
    assert result.returncode == 2
    assert "readable by group or others" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.process
def test_check_config_of_the_example_file_succeeds() -> None:
    """The file operators copy to /etc is accepted as it is."""
    result = run_cli("run", "--check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert config_from_dict(tomllib.loads(result.stdout), "stdout") == Config()


def test_a_key_read_from_api_key_file_is_redacted_from_log_lines(tmp_path: Path) -> None:
    """Once read, a key from `api_key_file` never appears in a log line (as TILED_API_KEY's does not)."""
    from tiled_writer_sidecar.logs import redact

    key_file = tmp_path / "key"
    key_file.write_text("file-secret-51c2e8d0\n")
    key_file.chmod(0o600)
    assert Config().with_overrides(tiled_api_key_file=str(key_file)).api_key() == "file-secret-51c2e8d0"
    assert "file-secret-51c2e8d0" not in redact("request failed: Apikey file-secret-51c2e8d0 refused")
