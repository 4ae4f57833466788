"""tiled-writer-sidecar."""
