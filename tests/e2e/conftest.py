"""Fixtures the PostgreSQL-backed Tiled tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer, postgres_unavailable


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of its own with databases ``catalog`` and ``tables`` (skipped, with the
    reason, where PostgreSQL is not installed)."""
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with PostgresServer(tmp_path / "postgres", databases=("catalog", "tables")) as server:
        yield server
