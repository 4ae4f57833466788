"""tiled-writer-sidecar: durable out-of-process writer of bluesky documents into Tiled.

`__version__` is the installed distribution's version (package metadata, set in
pyproject.toml): the one version that ``--version``, the start-up log line, the
``tiled_writer_sidecar_build_info`` metric and the User-Agent sent to Tiled show.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tiled-writer-sidecar")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

#: The HTTP User-Agent of every request the uploader sends to Tiled.
USER_AGENT = f"tiled-writer-sidecar/{__version__}"

__all__ = ["USER_AGENT", "__version__"]
