"""`tiled-writer-sidecar run`: the receiver loop, its uploader child, ``/metrics`` and ``/healthz``.

Runs in the daemon's main process. Imports the root's shared modules, `documents`, `spool` and
`receive`; of `upload` only the uploader process's entry point (`upload.main`), to start it.
"""
