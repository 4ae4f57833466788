"""Helpers shared by the test files (and `benchmarks`), each written once.

Imported as ``tests.support.<module>``: pytest puts the repository root on
``sys.path`` (``pythonpath`` in pyproject.toml) and so does ``python -m
benchmarks.run``; ``tests`` itself is a namespace package. Nothing here is
shipped in the wheel; the harness that ``demo`` needs stays in
`tiled_writer_sidecar.testing`.

- `framing`: messages framed as bluesky's `Publisher` sends them, its serializers, a capturing `Publisher`.
- `hostile_pickles`: objects that pickle like numpy's, with states numpy never writes.
- `daemon`: the running daemon as the e2e tests check it (``/metrics``, ``status``, Tiled rows).
- `spool`: runs planted straight into a spool.
- `run_engine`: real documents from a RunEngine with ophyd.sim devices, in the test process.
- `monitor_pane`: ``monitor`` live in a tmux pane.
- `postgres`: PostgreSQL, and Tiled (one server or a deployment of several) on it.
"""
