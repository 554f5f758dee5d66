"""The public surface of `asyncflow` and `dataplane` is pinned: a change here is a decision."""

from __future__ import annotations

import asyncflow
import dataplane


def test_asyncflow_all_is_pinned():
    assert sorted(asyncflow.__all__) == [
        "AsyncFlowConfig", "AsyncFlowError", "Client", "CodecError", "ConfigError", "ControlError",
        "DataPlaneConfig",
        "DataPlaneError", "LeaseError", "SchemaError", "StorageUnavailable", "StoreTimeout",
        "UnknownPartition", "WorkerError", "__version__", "load_config", "train",
    ]  # fmt: skip
    for name in asyncflow.__all__:
        assert hasattr(asyncflow, name)


def test_dataplane_all_is_pinned():
    assert sorted(dataplane.__all__) == [
        "Batch", "DataPlaneConfig", "FieldSpec", "StoreClient", "StoreHandle", "SyncStoreClient", "connect",
        "start_store", "store_address",
    ]  # fmt: skip
    for name in dataplane.__all__:  # every lazily loaded name is there
        assert getattr(dataplane, name) is not None


def test_the_data_store_imports_nothing_from_asyncflow():
    import subprocess
    import sys

    code = (
        "import sys, dataplane.client, dataplane.store, dataplane.memory.client, dataplane.redis.client; "
        "print(sorted(m for m in sys.modules if m == 'asyncflow' or m.startswith('asyncflow.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_errors_form_one_tree():
    for name in asyncflow.__all__:
        obj = getattr(asyncflow, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, asyncflow.AsyncFlowError)
