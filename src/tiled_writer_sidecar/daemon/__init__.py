"""`tiled-writer-sidecar run`: the receiver loop, its uploader child, ``/metrics`` and ``/healthz``.

Runs in the daemon's main process. Imports `receive`; of `upload` only the uploader process's
entry point, to start it.
"""
