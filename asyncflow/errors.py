"""One error tree for the whole product.

    AsyncFlowError
    ├── ConfigError            a config file or override is invalid (names the field path)
    ├── CodecError             a value cannot be encoded or a frame cannot be decoded
    ├── DataPlaneError         the data store refused or could not serve a request
    │   ├── SchemaError        a row does not match its partition's schema (dtype, shape, field)
    │   ├── UnknownPartition   no partition of that name exists
    │   ├── LeaseError         an ack or release names rows this consumer does not hold
    │   ├── StoreTimeout       a put (store full) or get (too few ready rows) ran out of time
    │   ├── StorageUnavailable a storage unit or backend cannot be reached
    │   └── AccessDenied       the store refused a client without its token
    ├── WorkerError            a worker (rollout, reward, trainer, ...) failed
    │   ├── WeightMismatch     received weights differ from the published ones (a bucket's fingerprint)
    │   └── Stalled            a stage made no progress within its watchdog deadline (diagnosis in stalls/)
    ├── ControlError           a live run cannot be found or refused a command (asyncflow.Client)
    └── RunStopped             SIGTERM ended the run before it could take a final checkpoint

The root and the store's errors are defined in `dataplane.errors` (the data store imports
nothing from `asyncflow`) and re-exported here. Every message says what was given, what was
expected, and how to fix it.
"""

from __future__ import annotations

from dataplane.errors import (
    AccessDenied,
    AsyncFlowError,
    CodecError,
    ConfigError,
    DataPlaneError,
    LeaseError,
    SchemaError,
    StorageUnavailable,
    StoreTimeout,
    UnknownPartition,
)

__all__ = [
    "AccessDenied",
    "AsyncFlowError",
    "CodecError",
    "ConfigError",
    "ControlError",
    "DataPlaneError",
    "LeaseError",
    "RankDied",
    "RunStopped",
    "SchemaError",
    "Stalled",
    "StorageUnavailable",
    "StoreTimeout",
    "UnknownPartition",
    "WeightMismatch",
    "WorkerError",
]


class WorkerError(AsyncFlowError, RuntimeError):
    """A worker actor failed; the message names the worker and the cause."""


class RankDied(WorkerError):
    """A trainer rank died: the others cannot finish a step without it; the run restarts them all
    from its last checkpoint (trainer.max_restarts times)."""


class Stalled(WorkerError):
    """A stage made no progress within its watchdog deadline and its policy (or its spent restarts)
    stops the run; the message names the stage and the diagnosis written under <run_dir>/stalls/."""


class ControlError(AsyncFlowError, RuntimeError):
    """No live run of that name, or the run refused or could not apply a command."""


class WeightMismatch(WorkerError):
    """A pulled version's bytes differ from what its publisher sent (a bucket's fingerprint or
    size); the message names the version, part, bucket, channel and both fingerprints."""


class RunStopped(AsyncFlowError, RuntimeError):
    """SIGTERM (job stop, eviction, node drain) ended the run before it reached a step boundary
    within sigterm_grace_s: no final checkpoint; the message says where a resume continues from."""
