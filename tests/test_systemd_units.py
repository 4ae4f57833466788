"""The systemd units in systemd/: valid, hardened, and consistent with the code.

`systemd-analyze verify` and `systemd-analyze security --offline=yes` work on
unit files without systemd running as PID 1 (as in a container or CI), so
these tests need only the `systemd` Debian package (scripts/system-deps.sh
installs it); without `systemd-analyze` they are skipped with that reason.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tiled_writer_sidecar.config import Config
from tiled_writer_sidecar.testing.ports import LOCALHOST, free_port, wait_until
from tiled_writer_sidecar.testing.proxy import proxy_command

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
SIDECAR = "tiled-writer-sidecar.service"
TEMPLATE = "tiled-writer-sidecar@.service"
INSTANCE = "tiled-writer-sidecar@bl1.service"  # what `systemctl start` names; loads TEMPLATE
PROXY = "bluesky-0mq-proxy.service"
BUFFERING_PROXY = "tiled-writer-sidecar-proxy.service"
INSTALL_BIN = "/opt/tiled-writer-sidecar/bin/"
VENV_BIN = Path(sys.executable).parent

#: systemd's own scale (src/analyze/analyze-security.c): exposure >= 9.0 UNSAFE,
#: >= 7.5 EXPOSED, >= 5.0 MEDIUM, >= 1.0 OK, >= 0.1 SAFE, 0 PERFECT.
OK_OR_BETTER = ("OK", "SAFE", "PERFECT")
EXPOSURE_LINE = re.compile(r"Overall exposure level for (?P<unit>\S+): (?P<score>\d+\.\d+) (?P<level>[A-Z]+)")


def parse_unit(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value assigned to it, in order (systemd allows repeats)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def one(unit: dict[str, list[str]], key: str) -> str:
    """The value of a key that must be set exactly once."""
    assert len(unit.get(key, [])) == 1, f"{key} must be set once, got {unit.get(key)}"
    return unit[key][0]


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return path


@pytest.fixture
def installed_units(tmp_path: Path) -> Path:
    """The units as `verify` needs them: ExecStart pointing at binaries that exist.

    `systemd-analyze verify` fails a unit whose ExecStart binary does not exist
    ("Command ... is not executable"). The units name the install prefix
    /opt/tiled-writer-sidecar/bin, which does not exist here, so the copies
    point at this venv's console scripts instead; nothing else is changed.
    """
    for name in (SIDECAR, TEMPLATE, PROXY, BUFFERING_PROXY):
        text = (UNITS / name).read_text()
        assert INSTALL_BIN in text, f"{name} no longer uses {INSTALL_BIN}; update this fixture"
        (tmp_path / name).write_text(text.replace(INSTALL_BIN, f"{VENV_BIN}/"))
    for script in ("tiled-writer-sidecar", "bluesky-0MQ-proxy"):
        assert (VENV_BIN / script).exists(), f"console script missing: {VENV_BIN / script}"
    return tmp_path


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=120, check=False
    )


# ------------------------------------------------------------------- verify


@pytest.mark.process
@pytest.mark.parametrize("name", [SIDECAR, INSTANCE, PROXY, BUFFERING_PROXY])
def test_unit_passes_systemd_analyze_verify(systemd_analyze: str, installed_units: Path, name: str) -> None:
    """No error and no warning about the unit (verify only warns, exit 0, on an unknown key); an
    instance of the template is verified through the template file next to it."""
    result = run_analyze("verify", str(installed_units / name))
    about_unit = [line for line in result.stderr.splitlines() if name.split("@")[0] in line]
    assert result.returncode == 0, result.stderr
    assert about_unit == []


@pytest.mark.process
@pytest.mark.parametrize(("edited", "verified"), [(SIDECAR, SIDECAR), (TEMPLATE, INSTANCE)])
def test_verify_catches_a_misspelt_key(
    systemd_analyze: str, installed_units: Path, edited: str, verified: str
) -> None:
    """The check above would see a typo (in the template too): verify names the file and the key."""
    path = installed_units / edited
    path.write_text(path.read_text().replace("WatchdogSec=", "WatchdgSec="))
    result = run_analyze("verify", str(installed_units / verified))
    assert any(edited in line and "WatchdgSec" in line for line in result.stderr.splitlines())


# ----------------------------------------------------------------- security


@pytest.mark.process
@pytest.mark.parametrize("name", [SIDECAR, INSTANCE, PROXY, BUFFERING_PROXY])
def test_security_exposure_is_ok_or_better(
    systemd_analyze: str, installed_units: Path, name: str, record_property: Callable[[str, object], None]
) -> None:
    """`systemd-analyze security --offline=yes` rates the unit OK or better (exposure below 5.0)."""
    result = run_analyze("security", "--offline=yes", "--no-pager", str(installed_units / name))
    assert result.returncode == 0, result.stderr
    match = EXPOSURE_LINE.search(result.stdout)
    assert match is not None, result.stdout[-2000:]
    score, level = float(match["score"]), match["level"]
    record_property("exposure", f"{score} {level}")
    print(f"{name}: overall exposure {score} {level}")
    assert level in OK_OR_BETTER, result.stdout
    assert score < 5.0


# ------------------------------------------- what the issue asks of the units


@pytest.fixture(scope="module")
def sidecar() -> dict[str, list[str]]:
    return parse_unit(UNITS / SIDECAR)


@pytest.fixture(scope="module")
def proxy() -> dict[str, list[str]]:
    return parse_unit(UNITS / PROXY)


def test_sidecar_is_a_notify_service_with_a_watchdog(sidecar: dict[str, list[str]]) -> None:
    assert one(sidecar, "Service.Type") == "notify"
    assert one(sidecar, "Service.NotifyAccess") == "main"
    assert one(sidecar, "Service.WatchdogSec") == "30"
    assert one(sidecar, "Service.Restart") == "on-failure"
    assert one(sidecar, "Service.TimeoutStopSec") == "30"


def test_sidecar_stops_in_the_order_the_daemon_expects(sidecar: dict[str, list[str]]) -> None:
    """SIGTERM to the main process only; it drains, then stops the uploader itself in time."""
    from tiled_writer_sidecar.daemon import main as daemon

    assert one(sidecar, "Service.KillMode") == "mixed"
    assert int(one(sidecar, "Service.TimeoutStopSec")) > daemon.UPLOADER_STOP_SECONDS


def test_sidecar_runs_the_daemon_with_the_etc_config(sidecar: dict[str, list[str]]) -> None:
    assert one(sidecar, "Service.ExecStart") == (
        f"{INSTALL_BIN}tiled-writer-sidecar run --config /etc/tiled-writer-sidecar/tiled-writer-sidecar.toml"
    )


def test_sidecar_starts_after_the_proxy_and_the_network_without_depending_on_them(
    sidecar: dict[str, list[str]],
) -> None:
    """Wants=, not Requires=: a proxy restart must not stop the sidecar (0MQ reconnects by itself)."""
    for key in ("Unit.After", "Unit.Wants"):
        names = " ".join(sidecar[key]).split()
        assert PROXY in names
        assert "network-online.target" in names
    assert "Unit.Requires" not in sidecar
    assert "Unit.BindsTo" not in sidecar


def test_the_state_directory_holds_the_default_spool(sidecar: dict[str, list[str]]) -> None:
    """StateDirectory= creates /var/lib/<name>, owned by the service user and kept across upgrades."""
    state = one(sidecar, "Service.StateDirectory")
    assert Path(Config().spool.dir).parent == Path("/var/lib") / state
    assert one(sidecar, "Service.StateDirectoryMode") == "0700"


def test_the_api_key_comes_in_as_a_credential(sidecar: dict[str, list[str]]) -> None:
    assert one(sidecar, "Service.LoadCredential") == ("tiled-api-key:/etc/tiled-writer-sidecar/tiled-api-key")
    assert not any("TILED_API_KEY=" in value for value in sidecar.get("Service.Environment", []))


def test_sidecar_runs_unprivileged_and_sandboxed(sidecar: dict[str, list[str]]) -> None:
    """The hardening the issue lists, each spelled out (the exposure score alone could hide one)."""
    assert one(sidecar, "Service.DynamicUser") == "yes"
    assert one(sidecar, "Service.CapabilityBoundingSet") == ""
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expected.items():
        assert one(sidecar, f"Service.{key}") == value, key
    assert "@system-service" in sidecar["Service.SystemCallFilter"]


def test_sidecar_allows_writable_executable_memory_for_numba(sidecar: dict[str, list[str]]) -> None:
    """The Tiled client imports numba (via dask and sparse), which needs W+X memory at import."""
    assert "Service.MemoryDenyWriteExecute" not in sidecar


def test_proxy_has_explicit_addresses_matching_the_sidecar_default(proxy: dict[str, list[str]]) -> None:
    """The proxy's out-address default is the address the sidecar subscribes to by default."""
    exec_start = one(proxy, "Service.ExecStart")
    assert exec_start.startswith(f"{INSTALL_BIN}bluesky-0MQ-proxy ")
    assert "--in-address ${PROXY_IN_ADDRESS}" in exec_start
    assert "--out-address ${PROXY_OUT_ADDRESS}" in exec_start
    defaults = dict(value.split("=", 1) for value in proxy["Service.Environment"])
    assert defaults["PROXY_OUT_ADDRESS"] == Config().zmq.address
    assert defaults["PROXY_IN_ADDRESS"] != defaults["PROXY_OUT_ADDRESS"]


def test_proxy_restarts_always_and_stops_with_sigint(proxy: dict[str, list[str]]) -> None:
    """bluesky-0MQ-proxy exits cleanly (code 0) only on KeyboardInterrupt."""
    assert one(proxy, "Service.Restart") == "always"
    assert one(proxy, "Service.KillSignal") == "SIGINT"
    assert one(proxy, "Service.DynamicUser") == "yes"


@pytest.mark.process
def test_proxy_exits_0_on_sigint_as_its_unit_expects(tmp_path: Path) -> None:
    """KillSignal=SIGINT in the proxy unit: bluesky-0MQ-proxy then stops at once with exit code 0."""
    log = tmp_path / "proxy.log"
    in_address, out_address = (f"tcp://{LOCALHOST}:{free_port()}" for _ in range(2))
    with log.open("w") as out:
        process = subprocess.Popen(
            [*proxy_command(), "--in-address", in_address, "--out-address", out_address],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PYTHONUNBUFFERED": "1", "PATH": str(VENV_BIN)},
            # systemd starts services with default signal handling; a shell may
            # have left SIGINT ignored for background jobs.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        wait_until(lambda: "Ctrl+C" in log.read_text(), timeout=60, what="the proxy to start")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ------------------------------------------------- the template: N sidecars per host (issue 22)

#: The only keys in which the template differs from the single unit: each names the instance (%i).
PER_INSTANCE = {
    "Unit.Description",
    "Service.ExecStart",
    "Service.EnvironmentFile",
    "Service.Environment",
    "Service.LoadCredential",
    "Service.StateDirectory",
}


def test_the_template_is_the_sidecar_unit_with_per_instance_paths(sidecar: dict[str, list[str]]) -> None:
    """Every hardening, limit and ordering key is the single unit's; what differs names the instance."""
    template = parse_unit(UNITS / TEMPLATE)
    same = {k: v for k, v in template.items() if k not in PER_INSTANCE}
    assert same == {k: v for k, v in sidecar.items() if k not in PER_INSTANCE}
    for key in PER_INSTANCE:
        assert template[key] != sidecar[key], key
        assert any("%i" in value for value in template[key]), key


def test_each_instance_has_its_own_config_spool_and_api_key() -> None:
    """Instance NAME: /etc/tiled-writer-sidecar/NAME.toml, a spool under its own state directory."""
    template = parse_unit(UNITS / TEMPLATE)
    state = one(template, "Service.StateDirectory")
    assert state == "tiled-writer-sidecar/%i"
    assert one(template, "Service.ExecStart") == (
        f"{INSTALL_BIN}tiled-writer-sidecar run --config /etc/tiled-writer-sidecar/%i.toml "
        f"--spool-dir /var/lib/{state}/spool"
    )
    assert one(template, "Service.LoadCredential") == "tiled-api-key:/etc/tiled-writer-sidecar/%i.api-key"


# ------------------------------------------------------ resource limits (issue 12)

#: Measured in benchmarks/RESULTS.md ("Memory"): receiver RSS, uploader peak RSS while draining.
RECEIVER_RSS_MIB = 60
UPLOADER_PEAK_RSS_MIB = 257
#: bluesky-0MQ-proxy's idle RSS (measured: VmRSS of a fresh proxy, ~50 MiB).
PROXY_RSS_MIB = 50


def mib(value: str) -> float:
    """A systemd size (``512M``, ``1G``, plain bytes) in MiB."""
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}
    if value[-1].upper() in units:
        return float(value[:-1]) * units[value[-1].upper()]
    return int(value) / 2**20


def test_sidecar_memory_limits_leave_room_above_the_measured_peak(sidecar: dict[str, list[str]]) -> None:
    """MemoryHigh= at least twice the measured peak of both processes; MemoryMax= above it."""
    measured = RECEIVER_RSS_MIB + UPLOADER_PEAK_RSS_MIB
    high, ceiling = mib(one(sidecar, "Service.MemoryHigh")), mib(one(sidecar, "Service.MemoryMax"))
    assert 2 * measured <= high < ceiling <= 8 * measured


def test_an_oom_kill_of_the_uploader_does_not_stop_the_receiver(sidecar: dict[str, list[str]]) -> None:
    """systemd's default OOMPolicy=stop would stop the whole service; the uploader is the OOM victim."""
    from tiled_writer_sidecar.upload import main as upload_process

    assert one(sidecar, "Service.OOMPolicy") == "continue"
    assert upload_process.OOM_SCORE_ADJ > 0


def test_sidecar_file_limit_fits_every_open_run(sidecar: dict[str, list[str]]) -> None:
    """LimitNOFILE= holds one descriptor per open run at the default max_open_runs, plus the rest, twice."""
    from tiled_writer_sidecar.daemon import main as daemon

    needed = Config().spool.max_open_runs + daemon.FDS_BESIDES_RUNS
    assert int(one(sidecar, "Service.LimitNOFILE")) >= 2 * needed


def test_proxy_has_memory_and_file_limits(proxy: dict[str, list[str]]) -> None:
    assert mib(one(proxy, "Service.MemoryMax")) >= 4 * PROXY_RSS_MIB
    assert int(one(proxy, "Service.LimitNOFILE")) >= 1024


@pytest.mark.process
def test_the_daemon_raises_its_soft_file_limit_or_refuses_with_one_line() -> None:
    """In a child (limits are per process): soft limit raised to what max_open_runs needs; too low a hard limit is exit 2."""
    code = (
        "import resource, sys\n"
        "from tiled_writer_sidecar.daemon.main import ensure_file_limit\n"
        "from tiled_writer_sidecar.errors import ConfigError\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 600))\n"
        "needed = ensure_file_limit(300)\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == needed >= 300, needed\n"
        "try:\n"
        "    ensure_file_limit(10_000)\n"
        "except ConfigError as err:\n"
        "    assert err.exit_code == 2 and 'LimitNOFILE' in str(err) and '\\n' not in str(err)\n"
        "    print('refused')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"
