"""The streaming data store: controller (metadata), storage units (bytes), client, samplers, codec.

Producers `put` fields of rows, consumers `get` rows whose fields are ready, exactly once
per consumer, pushed as soon as they are. Start a store with `start_store(config)` on Ray,
or reach a running one with `connect(name)` / `StoreClient.connect(address)`.
"""

from dataplane.batch import Batch
from dataplane.client import StoreClient, SyncStoreClient
from dataplane.schema import FieldSpec
from dataplane.store import StoreHandle, connect, start_store, store_address

__all__ = [
    "Batch",
    "FieldSpec",
    "StoreClient",
    "StoreHandle",
    "SyncStoreClient",
    "connect",
    "start_store",
    "store_address",
]
