"""Fixtures that start real processes: Tiled, bluesky-0MQ-proxy, a RunEngine; and the unit layer.

Every fixture but `shared_tiled_server` is function-scoped; each cleans up
its process group in teardown (also after a failure or Ctrl+C). When a test fails, the tail of
each service's log is attached to the report as its own section.

The unit layer (`pytest -m unit`, `make unit`): every test that uses none of `PROCESS_FIXTURES` and is
marked neither `process` nor `slow` is marked `unit`, and while a test that uses none and is not
marked `process` runs (unit or slow), starting a process fails it (the rule is checked, not hoped): a
test that starts one itself is marked `process` by its module or itself. A `slow` test is a scale
measurement (`make test` runs it, `make unit` does not). Hypothesis runs the ``unit`` profile
unless ``--hypothesis-profile=ci`` (`make test`) says otherwise: tests/support/strength.py.
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import os
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

import tests.support.strength  # noqa: F401 - registers the `ci` and `unit` profiles
from tests.support.daemon import make_sidecar
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    TiledServer,
    ZmqProxy,
)
from tiled_writer_sidecar.testing.sidecar import SidecarProcess

settings.load_profile("unit")  # `--hypothesis-profile=ci` (`make test`) replaces it

#: Fixture names whose values have a `log_tail()` worth showing on failure (a test module may define
#: `postgres` or `deployment`: tests.support.postgres).
_LOGGED_FIXTURES = (
    "tiled_server",
    "shared_tiled_server",
    "tiled_container",
    "proxy",
    "postgres",
    "deployment",
)


#: The fixtures above and the modules' own fixtures that start a process (directly or through another).
PROCESS_FIXTURES = frozenset(
    {"tiled_server", "shared_tiled_server", "tiled_container", "proxy", "acquisition", "sidecar"}
    | {"postgres", "deployment", "sidecar_proxy", "make_proxy", "chain", "pipeline", "dist"}  # dist: uv build
)


def _starts_no_process(item: pytest.Item) -> bool:
    """True if `item` uses no process-starting fixture and is not marked `process`."""
    fixtures = set(getattr(item, "fixturenames", ()))
    return item.get_closest_marker("process") is None and not fixtures & PROCESS_FIXTURES


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `unit` every test that starts no process and is not marked `slow`."""
    for item in items:
        if _starts_no_process(item) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("a test of the unit layer started a process: mark it `process` (tests/conftest.py)")


@contextlib.contextmanager
def _no_process(item: pytest.Item) -> Iterator[None]:
    """While a test that should start none (unit or slow) runs, forking, spawning or exec'ing fails it."""
    if not _starts_no_process(item):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_posixsubprocess, "fork_exec", _refuse)  # multiprocessing's spawn
        patch.setattr(subprocess, "_fork_exec", _refuse)
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp"):  # not os.system: tests pickle it
            patch.setattr(os, name, _refuse)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """Its fixtures too, a module- or session-scoped one included (set up by the first test using it)."""
    with _no_process(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with _no_process(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in _LOGGED_FIXTURES:
            service = funcargs.get(name)
            if service is not None:
                where = getattr(service, "log_path", "each of its logs")
                report.sections.append((f"{name} log (tail of {where})", service.log_tail()))
    return report


@pytest.fixture
def tiled_server(tmp_path: Path) -> Iterator[TiledServer]:
    """A fresh Tiled server (SQLite catalog and tables) in tmp_path/tiled."""
    with TiledServer(tmp_path / "tiled") as server:
        yield server


@pytest.fixture(scope="session")
def shared_tiled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledServer]:
    """One Tiled server for the whole session (a cold start costs 10-20 s).

    For tests that only write and read their own runs (uids are unique).
    Never stop, kill, pause or restart it, nor count every run in it.
    """
    with TiledServer(tmp_path_factory.mktemp("shared-tiled")) as server:
        yield server


@pytest.fixture
def tiled_container(shared_tiled_server: TiledServer, tmp_path: Path) -> TiledContainer:
    """A fresh container in the session's Tiled server, for tests that never stop Tiled."""
    return TiledContainer(shared_tiled_server, tmp_path.name)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ZmqProxy]:
    """bluesky-0MQ-proxy on two free 127.0.0.1 ports, proven to forward."""
    with ZmqProxy(log_path=tmp_path / "proxy.log") as running:
        yield running


@pytest.fixture
def acquisition(proxy: ZmqProxy) -> Iterator[Acquisition]:
    """A RunEngine publishing to `proxy` and recording what it emitted."""
    with Acquisition.for_proxy(proxy) as acq:
        yield acq


@pytest.fixture
def sidecar(
    tmp_path: Path, proxy: ZmqProxy, tiled_container: TiledContainer, acquisition: Acquisition
) -> Iterator[SidecarProcess]:
    """The real daemon, default settings, writing to `tiled_container`, already subscribed to `proxy`."""
    with make_sidecar(tmp_path, proxy, tiled_container) as running:
        acquisition.wait_subscribers(lambda: running.messages_seen() > 0)
        yield running
