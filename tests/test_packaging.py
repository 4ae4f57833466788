"""What a facility installs: a wheel and sdist `twine check` accepts, one version, the files it needs.

The wheel and sdist are built from this checkout with `uv build` into a
temporary directory (as a release would be) and checked with `twine check`;
then the wheel's contents are read: the units, example config, alert rules
and dashboard are in it, no test code is, and `deep_publisher` imports from
it with none of the sidecar's own dependencies (what `pip install --no-deps`
into a RunEngine's environment gives).
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import metadata, version
from pathlib import Path

import pytest

import tiled_writer_sidecar
from tiled_writer_sidecar.commands.resources import CONFIGS, UNITS

REPO = Path(__file__).resolve().parents[1]
#: The sidecar's own dependencies, none of which a RunEngine's environment needs for deep_publisher.
SIDECAR_ONLY = (
    "tiled",
    "bluesky_tiled_plugins",
    "pyarrow",
    "pandas",
    "prometheus_client",
    "rich",
    "httpx",
    "watchfiles",
    "fastjsonschema",
)


def uv() -> str:
    found = shutil.which("uv") or next(
        (str(p) for p in (Path.home() / ".local/bin/uv", REPO / ".bootstrap/uv-venv/bin/uv") if p.exists()),
        None,
    )
    if found is None:
        pytest.skip("uv is not installed (scripts/bootstrap.sh installs it)")
    return found


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`uv build` of this checkout: one wheel and one sdist."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [uv(), "build", "--quiet", "--out-dir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob("*.whl")
    return wheel


@pytest.mark.process
def test_twine_check_accepts_the_wheel_and_the_sdist(dist: Path) -> None:
    """What PyPI (or a facility's index) would accept: metadata and README render."""
    files = sorted([*dist.glob("*.tar.gz"), *dist.glob("*.whl")])
    assert sorted(f.suffix for f in files) == [".gz", ".whl"]
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2


def test_the_wheel_carries_license_classifiers_urls_and_the_version(dist: Path) -> None:
    with zipfile.ZipFile(wheel_of(dist)) as wheel:
        (meta_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(wheel.read(meta_name))
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())
    assert meta["Version"] == tiled_writer_sidecar.__version__ == version("tiled-writer-sidecar")
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert "Programming Language :: Python :: 3.11" in meta.get_all("Classifier", [])
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL", []))
    assert {"Homepage", "Changelog", "Documentation", "Issues"} <= set(urls)
    assert "demo" in meta.get_all("Provides-Extra", [])


def test_the_wheel_ships_units_and_configs_and_no_test_code(dist: Path) -> None:
    """Every file print-unit / print-config prints is in the wheel, byte for byte the checkout's; no
    module in the wheel imports pytest or hypothesis, and no tests/ directory is in it."""
    with zipfile.ZipFile(wheel_of(dist)) as wheel:
        names = wheel.namelist()
        for unit in UNITS.values():
            assert wheel.read(f"tiled_writer_sidecar/data/{unit}") == (REPO / "systemd" / unit).read_bytes()
        for packaged, in_checkout in CONFIGS.values():
            assert wheel.read(f"tiled_writer_sidecar/data/{packaged}") == (REPO / in_checkout).read_bytes()
        sources = {n: wheel.read(n).decode() for n in names if n.endswith(".py")}
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    for name, source in sources.items():
        assert "import pytest" not in source and "import hypothesis" not in source, name


@pytest.mark.process
def test_deep_publisher_imports_from_the_wheel_without_the_sidecars_dependencies(
    dist: Path, tmp_path: Path
) -> None:
    """The wheel unpacked alone on sys.path, every sidecar-only dependency made unimportable (as in a
    RunEngine's environment after `pip install --no-deps`): deep_publisher imports and builds."""
    with zipfile.ZipFile(wheel_of(dist)) as wheel:
        wheel.extractall(tmp_path / "site")
    code = (
        "import sys\n"
        f"for name in {SIDECAR_ONLY!r}:\n"
        "    sys.modules[name] = None  # import raises ImportError\n"
        f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
        "from tiled_writer_sidecar.publisher import deep_publisher\n"
        "import tiled_writer_sidecar\n"
        "assert tiled_writer_sidecar.__file__.startswith(sys.path[0]), tiled_writer_sidecar.__file__\n"
        "publisher = deep_publisher('127.0.0.1:5577')\n"
        "publisher.close()\n"
        "print(tiled_writer_sidecar.__version__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == version("tiled-writer-sidecar")


def test_the_sdist_holds_what_a_rebuild_needs(dist: Path) -> None:
    """Units, configs, LICENSE, CHANGELOG and uv.lock are in the sdist (the wheel is built from them)."""
    import tarfile

    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {"LICENSE", "CHANGELOG.md", "uv.lock", "pyproject.toml", "README.md"}
    wanted |= {f"systemd/{unit}" for unit in UNITS.values()}
    wanted |= {in_checkout for _, in_checkout in CONFIGS.values()}
    assert wanted <= names, wanted - names
    assert not [n for n in names if n.startswith(".venv/")]


def test_the_installed_metadata_is_the_one_version() -> None:
    assert metadata("tiled-writer-sidecar")["Version"] == tiled_writer_sidecar.__version__
    assert f"tiled-writer-sidecar/{tiled_writer_sidecar.__version__}" == tiled_writer_sidecar.USER_AGENT
