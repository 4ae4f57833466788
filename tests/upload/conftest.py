"""Fixtures of the upload tests that run against a fake Tiled (`tests.support.fake_tiled`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fake_tiled import FakeTiled, Spool


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A spool directory the tests write runs into (`Spool.run`)."""
    return Spool(tmp_path / "spool")


@pytest.fixture
def tiled(monkeypatch: pytest.MonkeyPatch) -> FakeTiled:
    """A fake Tiled installed in place of the real client and TiledRun."""
    return FakeTiled().install(monkeypatch)
