"""The memory backend: the store's own Ray actors hold it.

A controller (metadata, readiness, consumption, leases: `controller`, `partition`) and
storage units (the bytes: `unit`) serve the store's wire protocol (`wire`, `auth`,
`buffers`); `client` is the backend's `dataplane.client.StoreClient`.
"""
