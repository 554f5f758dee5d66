"""Shared fixtures: one local Ray for the whole test session, and a store per backend.

Ray on a 2-core machine: the session starts one instance with more logical CPUs than
cores (the store's actors reserve fractions and mostly wait on I/O) and every test
reuses it; tests isolate themselves by partition name, not by restarting Ray.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", params=["memory"])
def store(request, ray_session):
    """A running store of each backend; the Redis backend joins this list when it lands."""
    from asyncflow.config import DataPlaneConfig
    from dataplane import start_store

    handle = start_store(DataPlaneConfig(name=f"test-{request.param}", backend=request.param, lease_s=30.0))
    yield handle
    handle.shutdown()


@pytest.fixture
async def client(store):
    from dataplane import StoreClient

    c = await StoreClient.connect(store.address)
    yield c
    await c.close()


@pytest.fixture
def client_sync(store):
    c = store.client()
    yield c
    c.close()


@pytest.fixture
def pname() -> str:
    """A partition name no other test uses."""
    return f"p{uuid.uuid4().hex[:10]}"
