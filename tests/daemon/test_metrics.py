"""What /metrics exports besides the lag histogram: version, zeros for every known label, Tiled's state
as a labelled gauge, the proxy connection, and both processes' memory and descriptors.

The real `MetricsServer` over a real spool, scraped over HTTP; the uploader
process is a real child process that holds the spool's uploader lock (as
the uploader does) and keeps some files open.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import tiled_writer_sidecar
from tiled_writer_sidecar.daemon.metrics import MetricsServer, known_rejections
from tiled_writer_sidecar.documents.wire import DOCUMENT_NAMES
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import atomic_write_json
from tiled_writer_sidecar.states import TILED_STATES
from tiled_writer_sidecar.testing import free_port, wait_until

P = "tiled_writer_sidecar"


class Scraped:
    def __init__(self, tmp_path: Path) -> None:
        self.spool = SpoolDir(tmp_path / "spool")
        self.stats = ReceiverStats()
        self.server = MetricsServer(f"127.0.0.1:{free_port()}", self.stats, self.spool)

    def samples(self) -> dict[str, float]:
        """``{'name{labels}': value}`` of one scrape."""
        text = httpx.get(f"http://127.0.0.1:{self.server.port}/metrics", timeout=10).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)}


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[Scraped]:
    scraped = Scraped(tmp_path)
    scraped.server.start()
    try:
        yield scraped
    finally:
        scraped.server.stop()


def test_build_info_names_the_package_version(scraped: Scraped) -> None:
    assert scraped.samples()[f'{P}_build_info{{version="{tiled_writer_sidecar.__version__}"}}'] == 1


def test_every_known_label_is_exported_at_zero_before_it_happens(scraped: Scraped) -> None:
    """A fresh sidecar: each document kind and each rejection reason has a sample, 0; one that then
    happens counts from there (so `increase(...) > 0` sees the first)."""
    samples = scraped.samples()
    for kind in DOCUMENT_NAMES:
        assert samples[f'{P}_documents_received_total{{kind="{kind}"}}'] == 0
    for reason in known_rejections():
        assert samples[f'{P}_messages_rejected_total{{reason="{reason}"}}'] == 0
    assert "descriptor-for-unknown-run" in known_rejections() and "schema" in known_rejections()
    scraped.stats.rejected["schema"] += 2
    scraped.stats.rejected["internal-error:KeyError"] += 1  # not known in advance: exported once seen
    samples = scraped.samples()
    assert samples[f'{P}_messages_rejected_total{{reason="schema"}}'] == 2
    assert samples[f'{P}_messages_rejected_total{{reason="internal-error:KeyError"}}'] == 1


@pytest.mark.parametrize("state", [*TILED_STATES, "unknown"])
def test_tiled_state_is_one_labelled_gauge(scraped: Scraped, state: str) -> None:
    """Exactly one of up/down/unauthorized/not_tiled/connecting is 1 (connecting before any report)."""
    if state != "unknown":
        atomic_write_json(scraped.spool.root / "uploader.json", {"tiled": state})
    samples = scraped.samples()
    values = {s: samples[f'{P}_tiled_state{{state="{s}"}}'] for s in TILED_STATES}
    assert values == {s: float(s == (state if state != "unknown" else "connecting")) for s in TILED_STATES}
    assert samples[f"{P}_tiled_up"] == float(state == "up")


def test_proxy_connected_follows_the_subscription(scraped: Scraped) -> None:
    assert scraped.samples()[f"{P}_proxy_connected"] == 0
    scraped.stats.connected = True
    assert scraped.samples()[f"{P}_proxy_connected"] == 1


@pytest.mark.process
def test_receiver_and_uploader_process_metrics(scraped: Scraped, tmp_path: Path) -> None:
    """The receiver's (this process) and the uploader's (a child holding the uploader lock with 50 more
    files open) memory and descriptors; the uploader's vanish when it exits."""
    samples = scraped.samples()
    assert samples[f"{P}_receiver_process_resident_memory_bytes"] > 10 * 2**20
    assert samples[f"{P}_receiver_process_open_fds"] > 0
    assert not any(name.startswith(f"{P}_uploader_process_") for name in samples)
    code = (
        "import sys\n"
        "from pathlib import Path\nfrom tiled_writer_sidecar.spool.directory import SpoolDir\n"
        f"SpoolDir(Path({str(scraped.spool.root)!r}), create=False).lock('uploader')\n"
        "files = [open('/dev/null') for _ in range(50)]\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        samples = scraped.samples()
        assert samples[f"{P}_uploader_process_open_fds"] >= 50
        assert samples[f"{P}_uploader_process_resident_memory_bytes"] > 5 * 2**20
        start = samples[f"{P}_uploader_process_start_time_seconds"]
        assert start >= samples[f"{P}_receiver_process_start_time_seconds"] - 1
    finally:
        child.communicate("", timeout=30)
    wait_until(
        lambda: not any(n.startswith(f"{P}_uploader_process_") for n in scraped.samples()),
        30,
        what="the uploader's process metrics to go",
    )
