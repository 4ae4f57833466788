"""The uploader process: the spool's runs into Tiled with bluesky-tiled-plugins' TiledWriter.

Runs in its own OS process (`upload.main`, started by the daemon) and in `replay`. Imports
the root's shared modules, `documents` and `spool`; never `receive` nor the daemon's metrics server.
"""
