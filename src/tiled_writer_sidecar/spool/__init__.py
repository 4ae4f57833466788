"""The spool: a durable, append-only log of documents, one directory per run."""
