"""`tiled-writer-sidecar demo` (the README's first command) runs to "demo passed" and cleans up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tiled_writer_sidecar.testing.sidecar import sidecar_command

pytestmark = pytest.mark.process  # each test runs the demo in its own process


def test_demo_passes_and_leaves_no_process_behind() -> None:
    """The demo runs both scans, survives the outage, proves the rows, exits 0, and kills its services."""
    result = subprocess.run(
        [*sidecar_command(), "demo"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "identical row for row" in result.stdout and "demo passed" in result.stdout
    assert "DIFFERENT" not in result.stdout
    leftovers = subprocess.run(
        ["pgrep", "-f", "(tiled serve|redis-server).*tiled-writer-sidecar-demo"], capture_output=True
    )
    assert leftovers.returncode == 1, leftovers.stdout


def test_the_demo_needs_no_test_framework() -> None:
    """`demo` from a runtime install (+ the demo extra): its whole import path works with pytest and
    hypothesis unimportable."""
    code = (
        "import sys\n"
        "sys.modules['pytest'] = sys.modules['hypothesis'] = None  # import raises ImportError\n"
        "import tiled_writer_sidecar.commands.demo, tiled_writer_sidecar.testing, tiled_writer_sidecar.testing.sidecar\n"
        "import tiled_writer_sidecar.testing.tiled_server, tiled_writer_sidecar.cli\n"
        "import ophyd.sim, bluesky.plans\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
