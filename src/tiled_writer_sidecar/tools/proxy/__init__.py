"""`tiled-writer-sidecar proxy`: a drop-in for bluesky-0MQ-proxy that buffers bursts."""
