"""The Redis backend: rows, metadata and consumption state all live in Redis.

`client` is the backend's `dataplane.client.StoreClient`; every change to a partition is an
atomic Lua script (`scripts`, key layout in `lua`); `connection` opens and retries, `wire`
reads cells into the batch's own buffers, `cells` encodes them, `snapshot` checkpoints.
"""
