"""What a bluesky document is to the sidecar: the 0MQ wire, schema validation, run routing.

Pure code, no files, no sockets: the receiver, its crash recovery, `import-backup` and `monitor`
share it. Imports the package root's shared modules and `spool` (what a run has received).
"""
