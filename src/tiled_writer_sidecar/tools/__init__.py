"""The sidecar's companions, each its own process: the drop-in 0MQ `proxy` and the live `monitor`.

They import the root's shared modules, `documents`, `receive.subscription` (the one way to
subscribe) and `daemon.sdnotify`; nothing imports them but the command line.
"""
