"""The command line as a user and a script see it: version, help, printed files, status output and exits.

Commands run in-process through `cli.main` (stdout captured: not a terminal);
what needs a real pipe (``status | head``) runs the console script in a shell.
"""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from tiled_writer_sidecar.cli import COMMANDS, build_parser, main
from tiled_writer_sidecar.commands.resources import CONFIGS, UNITS
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import Received
from tiled_writer_sidecar.testing.sidecar import sidecar_command

REPO = Path(__file__).resolve().parents[1]
UIDS = [f"8a1ee3f2-5c1d-4e7a-9b00-{n:012d}" for n in range(40)]


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """A spool with 40 pending runs whose uids are longer than any table column would allow."""
    root = tmp_path / "spool"
    spool = SpoolDir(root)
    spool.runs_dir.mkdir(exist_ok=True)
    for n, uid in enumerate(UIDS):
        directory = spool.run_dir(uid)
        directory.mkdir()
        Received(uid=uid, scan_id=n, plan_name="count", documents=4, closed=True, stop_received=True).save(
            directory
        )
    return root


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`main(args)` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exit:  # --help, --version
        code = int(exit.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_version_is_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"tiled-writer-sidecar {version('tiled-writer-sidecar')}\n", "")


def test_every_subcommand_has_a_summary_and_a_description() -> None:
    """`--help` lists each with a line; `COMMAND --help` opens with its own description."""
    parser = build_parser()
    top = parser.format_help()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == set(COMMANDS)  # type: ignore[arg-type]
    for name, (summary, description) in COMMANDS.items():
        assert summary.split()[0] in top
        sub_help = subparsers.choices[name].format_help()  # type: ignore[index]
        assert description.split(". ")[0].split()[0] in sub_help and len(description) > len(summary)


def test_print_unit_and_print_config_print_the_shipped_files(capsys: pytest.CaptureFixture[str]) -> None:
    for unit, name in UNITS.items():
        assert run(capsys, "print-unit", unit) == (0, (REPO / "systemd" / name).read_text(), "")
    for config, (_, in_checkout) in CONFIGS.items():
        assert run(capsys, "print-config", config) == (0, (REPO / in_checkout).read_text(), "")


def test_the_printed_example_config_is_a_valid_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `print-config` gives is what `run --check-config` accepts."""
    path = tmp_path / "sidecar.toml"
    path.write_text(run(capsys, "print-config")[1])
    code, _, err = run(capsys, "run", "--check-config", "--config", str(path))
    assert code == 0, err


def test_run_flags_override_metrics_address_and_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "run", "--check-config", "--metrics-address", "127.0.0.1:9555", "--log-level", "debug"
    )
    assert code == 0, err
    assert 'address = "127.0.0.1:9555"' in out and 'level = "DEBUG"' in out
    code, _, err = run(capsys, "run", "--check-config", "--metrics-address", "nowhere")
    assert code == 2 and "[metrics] address must be HOST:PORT" in err and "Traceback" not in err


def test_status_piped_shows_every_uid_in_full(spool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stdout is not a terminal: no uid is cut (what `replay RUN_UID` needs), on stdout, exit 0."""
    code, out, _ = run(capsys, "status", "--spool-dir", str(spool))
    assert code == 0
    assert all(uid in out for uid in UIDS)
    assert "…" not in out


@pytest.mark.process
def test_status_into_a_closed_pipe_exits_quietly(spool: Path) -> None:
    """`status | head -1`: no traceback and no "Broken pipe" error; the pipeline's status is 0."""
    command = " ".join([*sidecar_command(), "status", "--spool-dir", str(spool)])
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{command} | head -1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1


def test_status_json_exits_0_and_check_follows_nagios(
    spool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json exits 0 on a spool with problems; --check: CRITICAL for a stopped receiver, with perfdata;
    UNKNOWN (3) without a spool."""
    code, out, _ = run(capsys, "status", "--json", "--spool-dir", str(spool))
    assert code == 0 and len(json.loads(out)["runs"]) == len(UIDS)
    code, out, _ = run(capsys, "status", "--check", "--spool-dir", str(spool))
    assert code == 2 and out.startswith("TILED-WRITER-SIDECAR CRITICAL - receiver not running")
    assert "| runs=40 backlog_runs=40 " in out and out.count("\n") == 1
    code, out, _ = run(capsys, "status", "--check", "--spool-dir", str(tmp_path / "nowhere"))
    assert code == 3 and out.startswith("TILED-WRITER-SIDECAR UNKNOWN - ")


def test_unknown_print_unit_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["print-unit", "nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err
