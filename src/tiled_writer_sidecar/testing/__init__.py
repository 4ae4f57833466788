"""Real processes for tests and the `demo` command.

A Tiled server on SQLite storage (`TiledServer`), bluesky's own
`bluesky-0MQ-proxy` (`ZmqProxy`), and a RunEngine publishing through it
(`Acquisition`), each a context manager that cleans up its process group;
plus what Tiled must then contain (`expected_rows`) and what it does
contain (`read_stream`, `tree_summary`). Nothing here is mocked. `demo`
uses these, so they ship in the wheel; what only the tests and benchmarks of
a checkout need (PostgreSQL-backed Tiled, hostile pickles, a monitor in a
tmux pane) is in ``tests/support/``, not here.
"""

from tiled_writer_sidecar.testing.acquisition import (
    Acquisition,
    DocumentRecorder,
    as_python,
    expected_rows,
    run_uids,
)
from tiled_writer_sidecar.testing.ports import free_port, wait_until
from tiled_writer_sidecar.testing.proxy import (
    PROBE_PREFIX,
    ZmqProxy,
    is_probe,
    probe_message,
)
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream, tree_summary
from tiled_writer_sidecar.testing.tiled_server import TiledContainer, TiledServer

__all__ = [
    "PROBE_PREFIX",
    "Acquisition",
    "DocumentRecorder",
    "TiledContainer",
    "TiledServer",
    "ZmqProxy",
    "as_python",
    "expected_rows",
    "frame_rows",
    "free_port",
    "is_probe",
    "probe_message",
    "read_stream",
    "run_uids",
    "tree_summary",
    "wait_until",
]
