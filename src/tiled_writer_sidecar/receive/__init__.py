"""The receiver process: 0MQ frames in, one durable log per run out; never waits on Tiled.

Runs in the daemon's main process. Imports the root's shared modules, `documents` and `spool`; never `upload`
(the uploader is another OS process, which it sees only through the spool's state files).
"""
