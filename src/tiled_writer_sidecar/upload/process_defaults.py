"""Process-wide defaults for a process that uploads to Tiled; call `apply` before tiled is imported.

- The Tiled client retries each request for up to 45 s by default; the
  uploader has its own retry loop with state-change logging, so the
  client's is kept short (unless the environment says otherwise).
- Optional packages the uploader never needs are marked absent
  (``sys.modules[name] = None``, Python's documented way), so the libraries
  that would import them carry on as if they were not installed:
  ``sparse`` (dask imports it, and it imports numba: about 80 MiB resident)
  and ``blosc2`` (Tiled's media-type registry and client decoders import it
  to offer blosc2 compression: 33 MiB resident; without it the client
  simply does not advertise blosc2 in ``Accept-Encoding``, and the server
  answers with zstd or gzip instead).
- glibc gives each thread that allocates its own malloc arena (up to 8 per
  core), and memory freed in one arena is not reused by another: the
  uploader's HTTP and upload threads then hold several copies of a batch's
  peak. `apply` caps the arenas at `MALLOC_ARENAS` with ``mallopt``
  (what ``MALLOC_ARENA_MAX`` does; an operator's ``MALLOC_ARENA_MAX``
  wins). `release_memory` hands freed heap back to the kernel
  (``malloc_trim``), for a caller that has just finished a large piece of
  work. Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["MALLOC_ARENAS", "UNUSED_OPTIONAL_MODULES", "apply", "release_memory"]

#: Optional packages an uploading process never needs (see the module docstring).
UNUSED_OPTIONAL_MODULES = ("sparse", "blosc2")

#: glibc malloc arenas for the whole process.
MALLOC_ARENAS = 2

_M_ARENA_MAX = -8  # glibc's <malloc.h>


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 - present in glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def apply() -> None:
    os.environ.setdefault("TILED_RETRY_ATTEMPTS", "2")
    os.environ.setdefault("TILED_RETRY_TIMEOUT", "5")
    for name in UNUSED_OPTIONAL_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    limit_malloc_arenas()


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (unless ``MALLOC_ARENA_MAX`` is set); whether it was done."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_ARENA_MAX, arenas))


def release_memory() -> bool:
    """Give the heap's free memory back to the kernel (glibc ``malloc_trim``); whether any was."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
