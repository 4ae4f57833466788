"""The spool: a durable, append-only log of documents, one directory per run (docs/design.md, "The spool").

The one thing the two processes share; read and written by both, so it imports nothing above the
package root's shared modules. On disk::

    SPOOL/                              0700, refused if group or others may write to it
      receiver.lock  uploader.lock      flock'd: one receiver, one uploader (``run`` or ``replay``)
      uploader.json                     the uploader's status, read by ``/metrics`` and ``/healthz``
      runs/<run uid>/                   one run: its log and its two state files
          0000000000.seg ...            append-only records (`record`, `segment`); fixed-width names
          received.json                 the receiver's view of the run (`state_files.Received`)
          uploaded.json                 the uploader's view (`state_files.Uploaded`)
      orphans/run_start|descriptor/<uid>/  documents whose start never came (`orphans`)
      quarantine/                       rejected messages, bounded in bytes and files (`directory`)

Invariants:

- Only the receiver appends to a run's log and writes ``received.json``; only the uploader writes
  ``uploaded.json`` and ``uploader.json``. Each state file is replaced atomically (temporary file,
  fsync, rename, fsync of the directory), so a reader sees the old file or the new, never half.
- A record is self-checking (salted header CRC, payload CRC): whatever a payload holds is only data,
  a damaged record is exactly that record, and a torn tail is truncated when the run is reopened.
- A record's payload is the document in msgpack (`codec`), never the wire bytes: nothing read back
  from the spool is ever unpickled. Reads are bounded by the configuration (`segment.bound_reads`).
- Nothing is opened through a symlink: a run directory that is one is never listed, read or counted
  (`directory.SpoolDir.run_listing`, the one listing of runs).
- A run's segments are deleted only once Tiled has the whole run (or after ``retention_hours``); its
  two state files stay for the last runs, so ``status`` can show them.
"""
