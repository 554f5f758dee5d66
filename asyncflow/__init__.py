"""AsyncFlow: asynchronous streaming RL post-training on Ray.

Users import from here; `dataplane`, `services` and `workers` are for extension authors.
"""

from __future__ import annotations

from asyncflow.config import AsyncFlowConfig, DataPlaneConfig, load_config
from asyncflow.errors import (
    AsyncFlowError,
    CodecError,
    ConfigError,
    ControlError,
    DataPlaneError,
    LeaseError,
    SchemaError,
    StorageUnavailable,
    StoreTimeout,
    UnknownPartition,
    WorkerError,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # `train` pulls in Ray and torch, `Client` Ray; load them on first use so `import asyncflow` stays light.
    if name == "train":
        from asyncflow.recipes.grpo import train

        return train
    if name == "Client":
        from asyncflow.control import Client

        return Client
    raise AttributeError(f"module 'asyncflow' has no attribute {name!r}")


__all__ = [
    "AsyncFlowConfig",
    "AsyncFlowError",
    "Client",
    "CodecError",
    "ConfigError",
    "ControlError",
    "DataPlaneConfig",
    "DataPlaneError",
    "LeaseError",
    "SchemaError",
    "StorageUnavailable",
    "StoreTimeout",
    "UnknownPartition",
    "WorkerError",
    "__version__",
    "load_config",
    "train",
]
