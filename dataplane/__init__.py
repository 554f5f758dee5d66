"""The streaming data store: controller (metadata), storage units (bytes), client, samplers, codec.

Producers `put` fields of rows, consumers `get` rows whose fields are ready, exactly once
per consumer, pushed as soon as they are. Start a store with `start_store(config)` on Ray,
or reach a running one with `connect(name)` / `StoreClient.connect(address)`.

The package imports nothing from `asyncflow`; its names load on first use, so that
`dataplane.config` and `dataplane.errors` stay light (no Ray, no numpy).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers
    from dataplane.batch import Batch
    from dataplane.client import StoreClient, SyncStoreClient
    from dataplane.config import DataPlaneConfig
    from dataplane.schema import FieldSpec
    from dataplane.store import StoreHandle, connect, start_store, store_address

_WHERE = {
    "Batch": "dataplane.batch",
    "DataPlaneConfig": "dataplane.config",
    "FieldSpec": "dataplane.schema",
    "StoreClient": "dataplane.client",
    "SyncStoreClient": "dataplane.client",
    "StoreHandle": "dataplane.store",
    "connect": "dataplane.store",
    "start_store": "dataplane.store",
    "store_address": "dataplane.store",
}

__all__ = [
    "Batch",
    "DataPlaneConfig",
    "FieldSpec",
    "StoreClient",
    "StoreHandle",
    "SyncStoreClient",
    "connect",
    "start_store",
    "store_address",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dataplane' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
