"""`tiled-writer-sidecar monitor`: a second subscriber showing acquisition and the sidecar live."""
