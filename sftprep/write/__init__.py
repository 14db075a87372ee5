"""Write: kept samples spilled to disk (store), then shards, side tables and the manifest of an output
folder (output), safely (files: the low level)."""
