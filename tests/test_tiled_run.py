"""tiled_run's start-up check of TiledWriter's private hooks, without a Tiled server."""

from __future__ import annotations

import pytest
from bluesky_tiled_plugins.writing import tiled_writer

from tiled_writer_sidecar.errors import IncompatibleDependency
from tiled_writer_sidecar.tiled_run import PRIVATE_HOOKS, check_tiledwriter_api


def test_the_installed_bluesky_tiled_plugins_has_every_hook() -> None:
    """The locked bluesky-tiled-plugins passes the check the uploader makes when it starts."""
    check_tiledwriter_api()


@pytest.mark.parametrize("hook", [name for name, params in PRIVATE_HOOKS.items() if params is not None])
def test_a_renamed_hook_fails_in_one_line_naming_it_and_the_supported_versions(
    hook: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release without one of the private methods is refused by name, not discovered mid-run."""
    monkeypatch.delattr(tiled_writer._RunWriter, hook)
    with pytest.raises(IncompatibleDependency, match=rf"hook {hook}; .*>=2\.0\.12,<2\.1") as info:
        check_tiledwriter_api()
    assert "\n" not in str(info.value)


def test_a_hook_whose_parameters_changed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same name, other parameters: the sidecar's override would be called wrongly, so it is refused."""
    monkeypatch.setattr(tiled_writer._RunWriter, "_append_with_retry", lambda self, client, rows: None)
    with pytest.raises(IncompatibleDependency, match="_append_with_retry"):
        check_tiledwriter_api()
