"""Process-wide defaults for a process that uploads to Tiled; call `apply` before tiled is imported.

- The Tiled client retries each request for up to 45 s by default; the
  uploader has its own retry loop with state-change logging, so the
  client's is kept short (unless the environment says otherwise).
- dask imports the optional ``sparse`` package when it is installed, and
  ``sparse`` imports numba: about 80 MiB of resident memory for arrays the
  uploader never handles. Marking it absent (``sys.modules[name] = None``,
  Python's documented way) makes dask skip it, as if it were not installed.
"""

from __future__ import annotations

import os
import sys

__all__ = ["apply"]


def apply() -> None:
    os.environ.setdefault("TILED_RETRY_ATTEMPTS", "2")
    os.environ.setdefault("TILED_RETRY_TIMEOUT", "5")
    sys.modules.setdefault("sparse", None)  # type: ignore[arg-type]
