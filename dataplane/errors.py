"""The data store's errors, and the root of AsyncFlow's error tree.

    AsyncFlowError             the root (re-exported by `asyncflow.errors`, which adds the
    │                          platform's own: WorkerError, ControlError)
    ├── ConfigError            a config file, override or setting is invalid (names the field path)
    ├── CodecError             a value cannot be encoded or a frame cannot be decoded
    └── DataPlaneError         the data store refused or could not serve a request
        ├── SchemaError        a row does not match its partition's schema (dtype, shape, field)
        ├── UnknownPartition   no partition of that name exists
        ├── LeaseError         an ack or release names rows this consumer does not hold
        ├── StoreTimeout       a put (store full) or get (too few ready rows) ran out of time
        ├── StorageUnavailable a storage unit or backend cannot be reached
        └── AccessDenied       the store refused a client without its token

The root lives here because the data store is the lowest layer that raises: `dataplane`
imports nothing from `asyncflow`. Every message says what was given, what was expected, and
how to fix it.
"""

from __future__ import annotations


class AsyncFlowError(Exception):
    """Base of every error raised by AsyncFlow."""


class ConfigError(AsyncFlowError, ValueError):
    """A config file, a `--set` override, a setting or a plugin path is invalid."""


class CodecError(AsyncFlowError, TypeError):
    """A value has no wire encoding, or bytes on the wire are not a valid frame."""


class DataPlaneError(AsyncFlowError):
    """The data store refused a request or could not serve it."""


class SchemaError(DataPlaneError, ValueError):
    """Rows do not match the partition schema; nothing of the request was stored."""


class UnknownPartition(DataPlaneError, KeyError):
    """The named partition does not exist in this store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LeaseError(DataPlaneError):
    """Rows were acked or released by a consumer that does not hold their lease."""


class StoreTimeout(DataPlaneError, TimeoutError):
    """A put waited for capacity, or a get for ready rows, longer than its timeout."""


class StorageUnavailable(DataPlaneError, ConnectionError):
    """A storage unit or storage backend cannot be reached."""


class AccessDenied(DataPlaneError, PermissionError):
    """The store refused a client that does not hold its token (or a listener was not the store)."""
